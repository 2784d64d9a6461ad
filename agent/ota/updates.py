"""Over-the-air model updates: one pipeline for every package, whichever way it came in.

incoming/<package>/ -> verify (signature, size, sha256; agent/ota/modelpkg.py) -> anti-rollback
(newer than every installed or failed version) -> stage (ota/models/<version>/) -> a second
inference worker loads it under SCHED_IDLE, stopped while the serving worker answers
(agent/inference/hold.py) -> canary -> back to normal priority -> switch
traffic (agent/inference/switch.py: the reading in
flight finishes on the old worker) -> probation -> commit, or switch back to the still-running old
worker and mark the version failed.

Every state change is written to ota/state.json before it takes effect, so a SIGKILL at any step
leaves one consistent active model: a start that finds a trial counts it and rolls it back at
`ota.max_trial_starts` (agent/ota/startup.py); a trial it leaves open is resumed here (from the
load, or from the start of probation). A graceful stop marks the open trial. An older or
failed version passes anti-rollback only with a signed rollback directive (agent/ota/directive.py).
Every step is reported through the outbox on <prefix>/<device_id>/events/model, and the
retained .../status/model names the active model. Owns the OTA flow; never touches llama.cpp,
MQTT or SQLite directly, and touches files only in threads (tests/test_blocking.py checks).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import structlog

from agent import __version__
from agent.base.errors import AgentError, ModelLoadError
from agent.base.records import ModelInfo
from agent.base.waits import first_of
from agent.config.settings import Settings
from agent.inference.hold import CandidateHold
from agent.inference.supervisor import InferenceWorker
from agent.inference.switch import Figures, Served, WorkerSwitch
from agent.ota import directive, modelpkg
from agent.ota.startup import describe, model_for
from agent.ota.state import BASE, ModelStore, OtaState, Trial
from agent.ota.trial import (
    Complete,
    Verdict,
    canaries_for,
    golden_sets,
    probation_verdict,
    run_canary,
    run_golden,
)
from agent.routing.outbound import Topics, model_event_row, model_status_row
from agent.store.writer import Store

log = structlog.get_logger()


class Ota:
    """Runs update jobs one at a time, woken by the incoming-dir watcher or a request file."""

    def __init__(self, settings: Settings, store: Store, switch: WorkerSwitch, topics: Topics,
                 models: ModelStore) -> None:
        self._settings = settings
        self._ota = settings.ota
        self._store = store
        self._switch = switch
        self._topics = topics
        self._models = models
        self.wake = asyncio.Event()
        self._busy = False
        # The serving worker that stopped loading its model and was already fallen back from
        # (or had nothing to fall back to): not tried twice.
        self._fallen_from: InferenceWorker | None = None

    # -- reporting ----------------------------------------------------------------------------

    async def report(self, step: str, **body: Any) -> None:
        """Log the step and queue it for the cloud (kept in the outbox until delivered)."""
        log.info("model_update_step", step=step, **body)
        await self._store.enqueue(model_event_row(self._topics, uuid.uuid4().hex, step,
                                                  {"at": time.time(), **body}))

    async def publish_status(self) -> None:
        state = await asyncio.to_thread(self._models.read)
        info = self._switch.info
        body = {"at": time.time(),
                "active": {"name": info.name, "version": info.version, "sha256": info.sha256},
                "state_active": state.active, "previous": state.previous,
                "trial": None if state.trial is None else state.trial.version,
                "failed": sorted(state.failed),
                # The active model's golden-set figures (canary, probation), when it had any.
                "golden": state.installed.get(state.active, {}).get("golden")}
        await self._store.enqueue(model_status_row(self._topics, uuid.uuid4().hex, body))

    # -- the loop -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, startup_reports: list[tuple[str, dict[str, Any]]]
                  ) -> None:
        for step, body in startup_reports:
            await self.report(step, **body)
        if self._ota.trusted_keys:  # without trusted keys updates are off: nothing to announce
            await self.publish_status()
        try:
            state = await asyncio.to_thread(self._models.read)
            if state.trial is not None:
                await self._resume(state.trial, stop)
            while not stop.is_set():
                self.wake.clear()
                await self.scan(stop)
                serving = self._switch.serving.worker
                if serving.unavailable is not None and serving is not self._fallen_from:
                    self._fallen_from = serving  # one fallback per worker that stopped loading
                    await self._fall_back(serving)
                    continue
                if serving is self._fallen_from:
                    await first_of(self.wake, stop)
                else:
                    await first_of(self.wake, stop, serving.went_unavailable)
        finally:
            if stop.is_set():  # a graceful stop, even one that had to cancel us
                # Set before the await: a staging thread still running records `stopped`
                # itself. A second cancel during the await cannot stop the marking thread,
                # and asyncio.run waits for the default executor before it returns.
                self._models.stopping.set()
                await asyncio.to_thread(self._leave_trial_open)

    def _leave_trial_open(self) -> None:
        """Mark an open trial as stopped, not crashed (blocking: the state file's lock and
        fsync; run in a thread). Writes nothing without a trial; a write that fails leaves the
        stop counted as a crash (the safe side) rather than failing the shutdown drain."""
        if self._models.read().trial is None:
            return

        def mark(state: OtaState) -> None:
            if state.trial is not None:
                state.trial.stopped = True
                log.info("model_trial_left_open", version=state.trial.version,
                         phase=state.trial.phase)

        try:
            self._models.update(mark)
        except OSError as exc:
            log.error("model_trial_mark_failed", error=str(exc))

    async def scan(self, stop: asyncio.Event) -> None:
        """Act on a rollback request, then on each complete package in incoming/."""
        if await asyncio.to_thread(self._models.take_rollback_request):
            await self._operator_rollback()
        for entry in await asyncio.to_thread(entries, self._settings.incoming_dir):
            if stop.is_set():
                return
            # Names starting with "." are being written (`model install` renames
            # a finished package into place); plain files are not packages.
            if entry.name.startswith(".") or not await asyncio.to_thread(entry.is_dir):
                continue
            try:
                await self.install(entry, stop)
            except Exception as exc:  # one broken package must not take the agent down
                log.error("model_update_failed", package=entry.name, error=str(exc),
                          error_type=type(exc).__name__)
                await asyncio.to_thread(self._discard, entry)
                orphan = (await asyncio.to_thread(self._models.read)).trial
                if orphan is not None:
                    # A trial nobody runs any more (a report failed on a full store after the
                    # switch, say): the new model may be serving unjudged. Restarting hands it
                    # to start-up recovery, which resumes or rolls it back.
                    log.critical("model_trial_orphaned", version=orphan.version,
                                 phase=orphan.phase)
                    raise

    # -- one package ----------------------------------------------------------------------------

    async def install(self, directory: Path, stop: asyncio.Event) -> bool:
        """Take one package through the whole pipeline; True if it was committed."""
        # The serving model's figures before this update does any work (hashing, copying,
        # a second worker) that competes with it for the CPU: the probation baseline.
        baseline = self._switch.serving.window.figures()
        await self.report("received", package=directory.name)
        try:
            package = await modelpkg.verify(directory, self._ota.trusted_keys)
            allowed_by = await asyncio.to_thread(directive.read, directory,
                                                 self._ota.trusted_keys)
            await asyncio.to_thread(self.check_newer, package.manifest, allowed_by)
        except modelpkg.PackageRejected as exc:
            await self.report("rejected", package=directory.name, reason=str(exc))
            await asyncio.to_thread(self._discard, directory)
            return False
        manifest = package.manifest
        await self.report("verified", version=manifest.version, name=manifest.name,
                          sha256=manifest.sha256, size=manifest.size, key_id=package.key_id,
                          **({} if allowed_by is None else
                             {"rollback_directive": allowed_by.describe()}))
        try:
            trial = await asyncio.to_thread(
                self._models.consume, package,
                None if allowed_by is None else allowed_by.describe(), directory)
        except (OSError, modelpkg.PackageRejected) as exc:
            await self.report("rejected", version=manifest.version,
                              reason=f"staging failed: {exc}")
            return False
        await self.report("staged", version=manifest.version, previous=trial.previous)
        return await self._try(trial, manifest, baseline, stop)

    async def _try(self, trial: Trial, manifest: modelpkg.Manifest, baseline: Figures | None,
                   stop: asyncio.Event) -> bool:
        """Load, canary, switch and judge a staged trial; True if it was committed. Without a
        `baseline` (a trial resumed at start) probation judges p95 by the canary budget."""
        state = await asyncio.to_thread(self._models.read)
        # Held at most for as long as its load may take: under a full backlog the update
        # takes at most one load deadline longer than it would unheld (agent/inference/hold.py).
        # Whatever ends the block (promotion, refusal, a stop, a cancel) continues it for good.
        with CandidateHold(self._switch.serving.worker,
                           self._settings.model.load_timeout_s) as hold:
            candidate = await self._start_candidate(state, trial, manifest, hold)
            if candidate is None:
                return False
            verdict = await run_canary(candidate, self._settings.routes,
                                       canaries_for(self._settings.routes, manifest.canary),
                                       self._ota, self._settings.model.seed)
            if verdict.passed and manifest.golden:
                golden = await self._golden(trial, manifest, candidate.complete,
                                            self._ota.golden_max_items, "canary")
                verdict = Verdict(golden.passed,
                                  verdict.reason if golden.passed else golden.reason,
                                  {**verdict.figures, **golden.figures})
            if not verdict.passed:
                await candidate.worker.close()
                await self._fail(trial, "canary", verdict, candidate_held=hold.figures())
                return False
            await self.report("canary_passed", version=trial.version, figures=verdict.figures,
                              candidate_held=hold.figures())
            if stop.is_set():  # stopping: no switch now; the next start resumes the trial
                await candidate.worker.close()
                return False
            try:
                await candidate.worker.end_yield()  # ends the hold first
            except AgentError as exc:  # at idle priority it would serve only a core nobody wants
                await candidate.worker.close()
                await self._fail(trial, "priority", Verdict(
                    False, f"the candidate did not return to normal CPU priority: {exc}",
                    verdict.figures))
                return False
        return await self._switch_and_judge(trial, candidate, baseline, stop)

    async def _resume(self, trial: Trial, stop: asyncio.Event) -> None:
        """A trial the last run left open (a graceful stop, or a crash with starts to spare):
        a candidate that never served is loaded and canaried again; one on probation is
        judged again from zero, while it serves."""
        await self.report("resumed", version=trial.version, phase=trial.phase,
                          starts=trial.starts, max_starts=self._ota.max_trial_starts)
        if trial.phase == "probation":
            await self._probation(trial, previous=None, baseline=None, stop=stop)
            return
        try:  # the staged copy, checked again: the signature and the bytes llama.cpp will read
            package = await modelpkg.verify(self._models.model_dir(trial.version),
                                            self._ota.trusted_keys)
        except modelpkg.PackageRejected as exc:
            await self._fail(trial, "resume", Verdict(False, str(exc), {}))
            return
        await self._try(trial, package.manifest, None, stop)

    def check_newer(self, manifest: modelpkg.Manifest,
                    allowed_by: directive.Directive | None = None) -> None:
        """Anti-rollback, blocking (reads the state file): PackageRejected if `manifest` may
        not be installed. An older or failed version needs a valid, unused rollback
        directive. agent/ota/remote.py asks before downloading anything."""
        state = self._models.read()
        version = manifest.version
        installed = state.installed.get(version)
        if version == state.active:
            raise modelpkg.PackageRejected(f"version {version} is already the active model")
        if state.trial is not None and state.trial.version == version:
            raise modelpkg.PackageRejected(f"version {version} is on trial now")
        if installed is not None and installed["sha256"] != manifest.sha256:
            raise modelpkg.PackageRejected(
                f"version {version} is installed with sha256 {installed['sha256']}, not "
                f"{manifest.sha256}: one version number, two different files")
        if allowed_by is not None:
            directive.check(allowed_by, manifest, self._settings.agent.device_id, time.time())
            used = state.directives.get(allowed_by.id)
            if used is not None:
                raise modelpkg.PackageRejected(
                    f"rollback directive {allowed_by.id} was used already (version "
                    f"{used.get('version')}); each directive works once")
        else:
            self._check_anti_rollback(state, manifest)
        minimum = manifest.min_agent_version
        if minimum and modelpkg.version_key(minimum) > modelpkg.version_key(__version__):
            raise modelpkg.PackageRejected(
                f"version {manifest.version} needs agent {minimum}; this is {__version__}")

    def _check_anti_rollback(self, state: OtaState, manifest: modelpkg.Manifest) -> None:
        version = manifest.version
        if version in state.failed:
            raise modelpkg.PackageRejected(
                f"version {version} failed before: {state.failed[version].get('reason')} "
                "(only a signed rollback directive lets it back)")
        highest = state.highest_version()
        base = self._settings.model.version
        if modelpkg.is_version(base):
            highest = max(highest or (), modelpkg.version_key(base))
        if highest is not None and modelpkg.version_key(version) <= highest:
            shown = ".".join(str(p) for p in highest)
            raise modelpkg.PackageRejected(
                f"version {version} is not newer than installed {shown} (anti-rollback)")

    def _discard(self, directory: Path) -> None:
        discard(directory)

    async def _start_candidate(self, state: OtaState, trial: Trial,
                               manifest: modelpkg.Manifest, hold: CandidateHold
                               ) -> Served | None:
        section, name = model_for(self._settings, state, self._models, trial.version)
        info = ModelInfo(name=name, version=trial.version, sha256=manifest.sha256,
                         path=str(section.path))
        # Under SCHED_IDLE until it passes (agent/inference/priority.py): its load, canary and
        # golden set take only CPU time the serving worker leaves unused, and none while it
        # answers (`hold`).
        worker = InferenceWorker(section, info, yield_cpu=True, hold=hold)
        try:
            await worker.start()
        except ModelLoadError as exc:
            await self._fail(trial, "load", Verdict(False, str(exc), {}),
                             candidate_held=hold.figures())
            return None
        await self.report("loaded", version=trial.version, pid=worker.pid,
                          scheduling=worker.scheduling, candidate_held=hold.figures())
        return Served(worker)

    async def _switch_and_judge(self, trial: Trial, candidate: Served, baseline: Figures | None,
                                stop: asyncio.Event) -> bool:
        def to_probation(state: OtaState) -> None:
            assert state.trial is not None
            state.trial.phase = "probation"
            state.active, state.previous = trial.version, trial.previous

        await asyncio.to_thread(self._models.update, to_probation)
        switched_at = time.monotonic()
        previous = self._switch.switch(candidate)
        await self.report("switched", version=trial.version,
                          previous=previous.info.version, in_flight=previous.leases)
        await self.publish_status()
        committed = await self._probation(trial, previous, baseline, stop)
        if committed is None:  # stopping: the trial stays in the state file for the next start
            await previous.worker.close()
            return False
        log.debug("probation_took", s=round(time.monotonic() - switched_at, 2))
        return committed

    async def _probation(self, trial: Trial, previous: Served | None, baseline: Figures | None,
                         stop: asyncio.Event) -> bool | None:
        served = self._switch.serving
        served.window.reset()
        deadline = time.monotonic() + self._ota.probation_max_s
        await self.report("probation_started", version=trial.version,
                          requests=self._ota.probation_requests,
                          max_s=self._ota.probation_max_s)
        operator = False
        while served.window.figures().requests < self._ota.probation_requests:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or stop.is_set():
                break
            if await asyncio.to_thread(self._models.take_rollback_request):
                operator = True
                break
            served.window.changed.clear()
            self.wake.clear()
            await wait_any(remaining, served.window.changed, self.wake, stop)
        if stop.is_set():
            return None
        verdict = probation_verdict(served.window.figures(), baseline, self._ota,
                                    self._ota.canary_latency_budget_ms)
        if verdict.passed and not operator and self._ota.probation_golden_items:
            manifest = await self._staged_manifest(trial)
            if manifest is None or manifest.golden:
                # Through the serving worker itself (its prefix cache, after live traffic),
                # not its window: the live figures stay the live readings'.
                golden = await self._golden(trial, manifest, served.worker.complete,
                                            self._ota.probation_golden_items, "probation")
                verdict = Verdict(golden.passed,
                                  verdict.reason if golden.passed else golden.reason,
                                  {**verdict.figures, **golden.figures})
        if stop.is_set():
            return None
        if operator:
            verdict = Verdict(False, "operator rollback during probation", verdict.figures)
        if verdict.passed:
            def commit(state: OtaState) -> None:
                state.trial = None
                state.failed.pop(trial.version, None)  # back by a rollback directive

            await asyncio.to_thread(self._models.update, commit)
            await self.report("committed", version=trial.version, figures=verdict.figures)
            await self.publish_status()
            if previous is not None:
                await previous.idle.wait()
                await previous.worker.close()
            return True
        verdict_at, verdict_wall = time.monotonic(), time.time()
        if previous is None:
            state = await asyncio.to_thread(self._models.read)
            section, info = await describe(self._settings, state, self._models, trial.previous)
            worker = InferenceWorker(section, info)
            await worker.start()
            previous = Served(worker)
        self._switch.switch(previous)
        back_ms = round((time.monotonic() - verdict_at) * 1000, 2)
        await self._fail(trial, "probation", verdict, switched_back_ms=back_ms,
                         verdict_at=verdict_wall)
        await served.idle.wait()
        await served.worker.close()
        return False

    async def _staged_manifest(self, trial: Trial) -> modelpkg.Manifest | None:
        """The signed manifest of the staged copy of `trial`; None if it no longer reads (the
        golden check then fails probation with the reason)."""
        try:
            manifest, _ = await asyncio.to_thread(
                modelpkg.read_signed, self._models.model_dir(trial.version),
                self._ota.trusted_keys)
        except modelpkg.PackageRejected as exc:
            log.error("model_golden_unreadable", version=trial.version, error=str(exc))
            return None
        return manifest

    async def _golden(self, trial: Trial, manifest: modelpkg.Manifest | None,
                      complete: Complete, limit: int, stage: str) -> Verdict:
        """Ask the package's golden sets (up to `limit` items each) through `complete`; the
        figures are recorded with the installed version, so `edge-agent model list` and the
        status show them."""
        try:
            if manifest is None:
                raise modelpkg.PackageRejected(
                    f"the staged manifest of version {trial.version} does not verify")
            sets, skipped = await asyncio.to_thread(
                golden_sets, self._models.model_dir(trial.version), manifest,
                self._settings.routes)
        except modelpkg.PackageRejected as exc:
            return Verdict(False, f"golden set: {exc}", {})
        verdict = await run_golden(complete, sets, limit, self._settings.model.seed)
        figures: dict[str, Any] = {**verdict.figures,
                                   **({"golden_skipped": skipped} if skipped else {})}
        await self.report("golden_checked", version=trial.version, stage=stage,
                          passed=verdict.passed, figures=figures)

        def record(state: OtaState) -> None:
            installed = state.installed.get(trial.version)
            if installed is not None:
                installed.setdefault("golden", {})[stage] = figures["golden"]

        await asyncio.to_thread(self._models.update, record)
        return Verdict(verdict.passed, verdict.reason, figures)

    async def _fail(self, trial: Trial, step: str, verdict: Verdict, **extra: Any) -> None:
        """Mark the version failed and make its predecessor the active model again."""
        def roll_back(state: OtaState) -> None:
            state.failed[trial.version] = {"reason": verdict.reason, "step": step,
                                           "at": time.time(), "figures": verdict.figures}
            if state.active == trial.version:  # it was serving: its predecessor comes back
                state.active, state.previous = trial.previous, trial.earlier
            if state.previous == trial.version:  # a directive had brought `previous` back
                state.previous = None
            state.trial = None
            self._models.prune(state)

        await asyncio.to_thread(self._models.update, roll_back)
        await self.report("rolled_back" if step == "probation" else "refused",
                          version=trial.version, stage=step, reason=verdict.reason,
                          figures=verdict.figures, active=trial.previous, **extra)
        await self.publish_status()

    async def _fall_back(self, broken: InferenceWorker) -> None:
        """The active model stopped loading while serving (FAULTS.md: damaged on disk, a load
        that times out): serve the previous good model where one exists, mark the broken
        version failed, and report it. With no earlier model (the base model itself broke) or an
        update on trial (its own verdict decides), readings wait until the model loads again."""
        state = await asyncio.to_thread(self._models.read)
        current = state.active
        target = state.previous if state.previous is not None else (
            BASE if current != BASE else None)
        reason = f"the model does not load while serving: {broken.unavailable}"
        if state.trial is not None or target is None:
            log.warning("model_fallback_unavailable", active=current, reason=reason,
                        why="an update is on trial" if state.trial is not None
                        else "no earlier model installed")
            return
        try:
            section, info = await describe(self._settings, state, self._models, target)
            worker = InferenceWorker(section, info)
            await worker.start()
        except AgentError as exc:
            await self.report("fallback_refused", version=current, target=target,
                              reason=f"{reason}; {target} does not start either: {exc}")
            return
        served = self._switch.switch(Served(worker))

        def fall_back(s: OtaState) -> None:
            s.failed[current] = {"reason": reason, "step": "serving", "at": time.time()}
            s.active, s.previous, s.trial = target, None, None

        await asyncio.to_thread(self._models.update, fall_back)
        await self.report("rolled_back", version=current, stage="serving", reason=reason,
                          active=target)
        await self.publish_status()
        await served.idle.wait()
        await served.worker.close()

    async def _operator_rollback(self) -> None:
        """`edge-agent model rollback`: back to the previous model; the current one is failed."""
        state = await asyncio.to_thread(self._models.read)
        if state.previous is None:
            await self.report("rollback_refused", reason="no previous model to roll back to",
                              active=state.active)
            return
        current, target = state.active, state.previous
        try:
            section, info = await describe(self._settings, state, self._models, target)
            worker = InferenceWorker(section, info)
            await worker.start()
        except AgentError as exc:
            await self.report("rollback_refused", reason=str(exc), active=current)
            return
        served = self._switch.switch(Served(worker))

        def roll_back(s: OtaState) -> None:
            s.failed[current] = {"reason": "operator rollback", "step": "operator",
                                 "at": time.time()}
            s.active, s.previous, s.trial = target, None, None

        await asyncio.to_thread(self._models.update, roll_back)
        await self.report("rolled_back", version=current, stage="operator",
                          reason="operator rollback", active=target)
        await self.publish_status()
        await served.idle.wait()
        await served.worker.close()


async def wait_any(timeout_s: float, *events: asyncio.Event) -> None:
    """Wait until one of the events is set, at most `timeout_s`."""
    either = asyncio.ensure_future(first_of(*events))
    try:
        await asyncio.wait([either], timeout=timeout_s)
    finally:
        either.cancel()


def entries(directory: Path) -> list[Path]:
    """The entries of `directory`, sorted by name; none if it does not exist. Blocking."""
    if not directory.is_dir():
        return []
    return sorted(directory.iterdir())


def discard(directory: Path) -> None:
    """Remove a package from incoming/. A package the agent cannot remove (one root left
    behind, owned by root) is never skipped silently: it is logged and renamed to a hidden
    name, which `scan` passes over, so it is not received and rejected again at every start."""
    try:
        shutil.rmtree(directory)
    except FileNotFoundError:
        return
    except OSError as exc:
        try:
            owner: int | None = directory.stat().st_uid
        except OSError:
            owner = None
        aside = directory.with_name(f".unremovable-{directory.name}-{uuid.uuid4().hex[:8]}")
        try:
            directory.rename(aside)
        except OSError as rename_exc:
            log.error("model_package_not_removed", package=directory.name,
                      path=str(directory), error=str(exc), owner_uid=owner,
                      agent_uid=os.geteuid(), set_aside=False, rename_error=str(rename_exc))
            return
        log.error("model_package_not_removed", package=directory.name, path=str(directory),
                  error=str(exc), owner_uid=owner, agent_uid=os.geteuid(),
                  set_aside=True, left_at=str(aside))
