"""Which model serves when the agent starts, and what start-up does about an update that a
crash or a stop interrupted.

`startup` counts this start against a trial left open in ota/state.json (unless a graceful stop
marked it), rolls the trial back once it reaches `ota.max_trial_starts`, clears staging
leftovers, and names the active model, falling back to the `[model]` section if the active
version's file is gone or changed. `model_for` and `describe` turn a version into worker
settings; agent/ota/updates.py uses them for candidates and rollbacks. Decides nothing about updates
in progress: agent/ota/updates.py resumes the trials this leaves open.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import structlog

from agent.base.errors import ModelLoadError
from agent.base.records import ModelInfo
from agent.config.settings import ModelSection, Settings
from agent.inference.supervisor import identify
from agent.ota.state import BASE, ModelStore, OtaState

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Startup:
    """The model to serve at start, and what start-up recovery did."""

    section: ModelSection
    info: ModelInfo
    reports: list[tuple[str, dict[str, Any]]]


def model_for(settings: Settings, state: OtaState, models: ModelStore, version: str
              ) -> tuple[ModelSection, str]:
    """The worker settings and model name of a version ("base" is the [model] section)."""
    if version == BASE:
        return settings.model, settings.model_name
    record = state.installed[version]
    section = settings.model.model_copy(update={
        "path": models.model_dir(version) / record["file"], "version": version,
        "n_ctx": int(record["n_ctx"]), "name": record["name"]})
    return section, str(record["name"])


async def describe(settings: Settings, state: OtaState, models: ModelStore, version: str
                   ) -> tuple[ModelSection, ModelInfo]:
    section, name = model_for(settings, state, models, version)
    info = await identify(section, name)
    expected = state.installed.get(version, {}).get("sha256")
    if expected is not None and info.sha256 != expected:
        raise ModelLoadError(f"{section.path}: sha256 {info.sha256} is not the installed "
                             f"{expected}; the file changed on disk")
    return section, info


async def decide_startup(settings: Settings, models: ModelStore) -> Startup:
    """Count this start against a trial in progress, roll back when it reaches
    `ota.max_trial_starts`, clear leftovers of an interrupted install, pick the active model."""
    reports: list[tuple[str, dict[str, Any]]] = []
    limit = settings.ota.max_trial_starts

    def count_start(state: OtaState) -> None:
        trial = state.trial
        if trial is None:
            return
        if trial.stopped:  # left open by a graceful stop, not a crash: resumed by Ota.run
            trial.stopped = False
            return
        trial.starts += 1
        if trial.starts < limit:
            return  # resumed by Ota.run
        reason = (f"the agent started {trial.starts} time(s) while version {trial.version} "
                  f"was on trial ({trial.phase})")
        state.failed[trial.version] = {"reason": reason, "step": "restart", "at": time.time(),
                                       "figures": {"starts": trial.starts}}
        state.active, state.trial = trial.previous, None
        state.previous = None if trial.earlier == trial.version else trial.earlier
        reports.append(("rolled_back", {"version": trial.version, "reason": reason,
                                        "active": state.active,
                                        "figures": {"starts": trial.starts}}))

    state = await asyncio.to_thread(models.update, count_start)
    removed = await asyncio.to_thread(models.remove_leftovers, state)
    if removed:
        log.info("ota_leftovers_removed", entries=removed)
    try:
        section, info = await describe(settings, state, models, state.active)
    except ModelLoadError as exc:
        if state.active == BASE:
            raise
        bad, why = state.active, str(exc)

        def fall_back(current: OtaState) -> None:
            current.failed[bad] = {"reason": why, "step": "start", "at": time.time()}
            current.active, current.previous, current.trial = BASE, None, None

        state = await asyncio.to_thread(models.update, fall_back)
        reports.append(("rolled_back", {"version": bad, "reason": why, "active": BASE}))
        section, info = await describe(settings, state, models, BASE)
    return Startup(section, info, reports)
