"""The model store under `<state_dir>/ota/`: installed versions, the OTA state file, its lock.

Layout: `ota/state.json` (which model is active, which was before it, which is on trial and how
many agent starts it has seen, which versions failed and why), `ota/models/<version>/` (a copy of
each installed package), `ota/lock` (flock held while the state is changed, so the agent and the
command line never interleave a read-modify-write), `ota/rollback.request` (written by
`edge-agent model rollback`, consumed by the agent).

The state file is replaced atomically (temp file in the same directory, write, fsync, rename,
fsync the directory): after a SIGKILL at any moment it is either the old or the new state.
"base" names the model of the `[model]` section. Blocking file I/O: the agent calls these
functions through `asyncio.to_thread`. Decides nothing about when to switch; agent/ota/updates.py
does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.base import durable
from agent.ota import modelpkg
from agent.ota.removal import remove_tree

BASE = "base"
STATE = "state.json"
ROLLBACK_REQUEST = "rollback.request"


@dataclass
class Trial:
    version: str
    previous: str
    phase: str  # "canary" (not serving yet) or "probation" (serving)
    starts: int = 0
    started_at: float = field(default_factory=time.time)
    # What `previous` was before the trial, restored when the trial rolls back.
    earlier: str | None = None
    # A graceful stop left the trial open: the next start resumes it without counting a start.
    stopped: bool = False


@dataclass
class OtaState:
    active: str = BASE
    previous: str | None = None
    trial: Trial | None = None
    installed: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Rollback directives used (agent/ota/directive.py), by id: each works once per gateway.
    directives: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "active": self.active, "previous": self.previous,
            "trial": None if self.trial is None else vars(self.trial),
            "installed": self.installed, "failed": self.failed, "directives": self.directives,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> OtaState:
        trial = body.get("trial")
        return cls(active=body.get("active", BASE), previous=body.get("previous"),
                   trial=None if trial is None else Trial(**trial),
                   installed=dict(body.get("installed", {})),
                   failed=dict(body.get("failed", {})),
                   directives=dict(body.get("directives", {})))

    def highest_version(self) -> tuple[int, ...] | None:
        known = [modelpkg.version_key(v) for v in [*self.installed, *self.failed]]
        return max(known) if known else None


class ModelStore:
    """The files under `ota/`. Reads need no lock (renames are atomic); changes take it."""

    def __init__(self, ota_dir: Path) -> None:
        self.dir = ota_dir
        self.models = ota_dir / "models"
        self.state_path = ota_dir / STATE
        self.rollback_request = ota_dir / ROLLBACK_REQUEST
        # Set when the agent stops gracefully: a trial opened from then on (a staging thread
        # that outlived the cancelled OTA task) is recorded as stopped, not crashed.
        self.stopping = threading.Event()

    def ensure(self) -> None:
        self.models.mkdir(parents=True, exist_ok=True)

    def read(self) -> OtaState:
        try:
            return OtaState.from_json(json.loads(self.state_path.read_bytes()))
        except FileNotFoundError:
            return OtaState()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.ensure()
        with (self.dir / "lock").open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def update(self, change: Callable[[OtaState], None]) -> OtaState:
        """Read, change and durably write the state under the lock; returns the new state."""
        with self._locked():
            state = self.read()
            change(state)
            durable.replace(self.state_path,
                          json.dumps(state.to_json(), indent=2, sort_keys=True).encode())
            return state

    def take_rollback_request(self) -> bool:
        """Consume the request `edge-agent model rollback` left, if there is one."""
        if not self.rollback_request.exists():
            return False
        self.rollback_request.unlink(missing_ok=True)
        return True

    def model_dir(self, version: str) -> Path:
        return self.models / version

    def stage(self, package: modelpkg.Verified, directive: dict[str, Any] | None = None
              ) -> Trial:
        """Copy a verified package to models/<version>/ durably, then record it as installed
        and on trial (phase "canary") in one state write: from then on a crash resumes or
        rolls back the trial, it cannot leave an installed version nobody tried.
        `directive` (the rollback directive that let it in) is recorded as used."""
        manifest = package.manifest
        open_trial = self.read().trial
        if open_trial is not None:  # one trial at a time; never overwrite an open one
            raise modelpkg.PackageRejected(f"version {open_trial.version} is still on trial")
        final = self.model_dir(manifest.version)
        if not _intact(final, package):
            # A leftover of a crash before the state write, or a damaged copy: replaced. An
            # intact copy (a directive bringing `previous` back) is kept, never deleted first.
            staging = self.models / f".staging-{manifest.version}-{os.getpid()}"
            remove_tree(staging, "staging copy of an earlier try")
            staging.mkdir(parents=True)
            for name in (*modelpkg.package_files(manifest), modelpkg.MANIFEST,
                         modelpkg.SIGNATURE):
                durable.copy_file(package.directory / name, staging / name)
            durable.fsync_dir(staging)
            remove_tree(final, "model copy that is not the signed package")
            os.replace(staging, final)
            durable.fsync_dir(self.models)
        # The copy must still be the signed bytes (a disk error, or a writer racing us).
        modelpkg.check_golden(final, manifest)
        modelpkg.check_file(final / manifest.file, manifest)

        trial = Trial(manifest.version, BASE, "canary")

        def record(state: OtaState) -> None:
            if state.trial is not None:
                raise modelpkg.PackageRejected(f"version {state.trial.version} is still on trial")
            trial.stopped = self.stopping.is_set()
            state.installed[manifest.version] = {
                "name": manifest.name, "file": manifest.file, "sha256": manifest.sha256,
                "size": manifest.size, "n_ctx": manifest.n_ctx, "installed_at": time.time(),
            }
            trial.previous, trial.earlier = state.active, state.previous
            state.trial = trial
            if directive is not None:
                state.directives[directive["id"]] = {**directive, "version": manifest.version,
                                                     "used_at": time.time()}

        self.update(record)
        return trial

    def consume(self, package: modelpkg.Verified, directive: dict[str, Any] | None,
                directory: Path) -> Trial:
        """`stage`, then delete the package from incoming/, in one thread: a stop that cancels
        the waiting task cannot delete the package under a copy still running."""
        try:
            return self.stage(package, directive)
        finally:
            remove_tree(directory, "package consumed from incoming/")

    def remove_leftovers(self, state: OtaState) -> list[str]:
        """Delete staging directories and model directories the state does not know; returns
        the names removed (one that stays is logged by remove_tree)."""
        removed: list[str] = []
        if not self.models.is_dir():
            return removed
        for entry in self.models.iterdir():
            leftover = entry.name.startswith(".staging-") or (
                entry.is_dir() and entry.name not in state.installed)
            if leftover and remove_tree(entry, "leftover of an interrupted install"):
                removed.append(entry.name)
        return removed

    def prune(self, state: OtaState) -> None:
        """Delete failed model files no state pointer names (their record stays in `failed`)."""
        keep = {state.active, state.previous, state.trial.version if state.trial else None}
        for version in list(state.installed):
            if version in state.failed and version not in keep:
                remove_tree(self.model_dir(version), "failed model no state names")


def _intact(directory: Path, package: modelpkg.Verified) -> bool:
    """Does `directory` already hold exactly this package's signed GGUF and manifest?"""
    try:
        modelpkg.check_golden(directory, package.manifest)
        modelpkg.check_file(directory / package.manifest.file, package.manifest)
        stored = json.loads((directory / modelpkg.MANIFEST).read_bytes())
        offered = json.loads((package.directory / modelpkg.MANIFEST).read_bytes())
    except (modelpkg.PackageRejected, OSError, ValueError):
        return False
    return modelpkg.canonical(stored) == modelpkg.canonical(offered)
