"""The OTA state file and model store on real files, at the edges a stop or a full disk
creates: one trial at a time, a staging thread outliving a stop, an intact copy kept, a
shutdown that must not fail on a full disk, a trial left without an owner."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.base.errors import StoreFull
from agent.ota import modelpkg
from agent.ota.removal import remove_tree
from agent.ota.state import ModelStore, OtaState
from agent.ota.updates import Ota
from tests.otakit import keypair, package
from tests.test_ota_swap import make_settings, running


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("ota-state-kit")
    key, public = keypair(work)
    return {"public": public, "pkg2": package(work, key, "2", seed=2),
            "pkg3": package(work, key, "3", seed=3)}


def verified(kit: dict[str, Any], name: str) -> modelpkg.Verified:
    return modelpkg.verify_blocking(kit[name], [kit["public"]])


def test_staging_opens_one_trial_and_refuses_a_second(kit: dict[str, Any],
                                                      tmp_path: Path) -> None:
    models = ModelStore(tmp_path / "ota")
    trial = models.stage(verified(kit, "pkg2"))
    state = models.read()
    assert state.trial is not None
    assert (state.trial.version, state.trial.phase, trial.previous) == ("2", "canary", "base")
    assert "2" in state.installed
    with pytest.raises(modelpkg.PackageRejected, match="version 2 is still on trial"):
        models.stage(verified(kit, "pkg3"))
    assert models.read().trial == state.trial
    assert not (models.models / "3").exists()


def test_removing_a_directory_already_gone_is_no_failure_and_a_failure_is_logged(
    tmp_path: Path
) -> None:
    """remove_tree never raises: a directory that is not there is simply done (nothing
    logged); one it cannot remove (here a plain file where a directory was expected) is
    logged as ota_directory_not_removed, and stays."""
    stray = tmp_path / ".staging-2-1"
    stray.write_bytes(b"not a directory")
    with capture_logs() as logs:
        assert remove_tree(tmp_path / "absent", "test leftover") is True
        assert logs == []
        assert remove_tree(stray, "test leftover") is False
    [event] = logs
    assert event["event"] == "ota_directory_not_removed"
    assert (event["path"], event["what"], event["failures"]) == (str(stray), "test leftover", 1)
    assert event["errors"] == [f"{stray}: Not a directory"]
    assert stray.read_bytes() == b"not a directory"


def test_a_trial_staged_after_a_stop_began_is_recorded_as_stopped(kit: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    """The staging thread outlives the cancelled OTA task: once `stopping` is set, the trial
    it opens is marked stopped, so the next start does not count it as a crash. The package
    leaves incoming/ only after the state write, and also when staging fails."""
    models = ModelStore(tmp_path / "ota")
    incoming = tmp_path / "incoming" / "pkg-2"
    incoming.parent.mkdir()
    shutil.copytree(kit["pkg2"], incoming)
    models.stopping.set()
    models.consume(modelpkg.verify_blocking(incoming, [kit["public"]]), None, incoming)
    trial = models.read().trial
    assert trial is not None
    assert trial.stopped
    assert not incoming.exists()

    shutil.copytree(kit["pkg3"], incoming)
    with pytest.raises(modelpkg.PackageRejected, match="still on trial"):
        models.consume(modelpkg.verify_blocking(incoming, [kit["public"]]), None, incoming)
    assert not incoming.exists()


def test_an_intact_installed_copy_is_kept_not_copied_again(kit: dict[str, Any],
                                                           tmp_path: Path) -> None:
    """A directive bringing back an installed version (`previous`) must not delete its live
    directory first: the intact copy is reused, file for file."""
    models = ModelStore(tmp_path / "ota")
    package2 = verified(kit, "pkg2")
    models.stage(package2)
    gguf = models.model_dir("2") / package2.manifest.file
    inode = gguf.stat().st_ino

    def end_trial(state: OtaState) -> None:
        state.trial = None

    models.update(end_trial)
    models.stage(package2)
    assert gguf.stat().st_ino == inode
    gguf.write_bytes(b"damaged")  # a damaged copy is replaced
    models.update(end_trial)
    models.stage(package2)
    assert gguf.stat().st_size == package2.manifest.size


@contextlib.contextmanager
def no_room_past(limit_bytes: int) -> Iterator[None]:
    """This process's writes past `limit_bytes` of a file fail with EFBIG (RLIMIT_FSIZE, with
    SIGXFSZ ignored): the kernel refuses them as a full disk would, without a fake."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


async def test_a_graceful_stop_without_a_trial_writes_nothing_and_a_full_disk_does_not_fail_it(
    kit: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    settings = make_settings(tmp_path, tiny_model, kit["public"])
    async with running(settings) as rig:
        written = rig.models.state_path.stat().st_mtime_ns  # by start-up
        stop = asyncio.Event()
        task = asyncio.create_task(rig.ota.run(stop, []))
        await asyncio.sleep(0.2)
        stop.set()
        rig.ota.wake.set()
        await asyncio.wait_for(task, 10)
        assert rig.models.state_path.stat().st_mtime_ns == written, "a stop without a trial "\
            "wrote the state"

        assert rig.models.stopping.is_set()
        rig.models.stopping.clear()  # as in a new run of the agent
        rig.models.stage(verified(kit, "pkg2"))

        with capture_logs() as logs, no_room_past(16):
            rig.ota._leave_trial_open()  # must not raise into the shutdown drain
        failed = [e for e in logs if e["event"] == "model_trial_mark_failed"]
        assert failed, logs
        assert "File too large" in failed[0]["error"]
        trial = rig.models.read().trial
        assert trial is not None
        assert not trial.stopped  # counted as a crash at the next start: the safe side


async def test_a_trial_left_without_an_owner_restarts_the_agent(
    kit: dict[str, Any], tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report that fails after staging (the store full) leaves a trial nobody runs: the OTA
    task raises instead of taking the next package, so start-up recovery gets it."""
    settings = make_settings(tmp_path, tiny_model, kit["public"])
    incoming = settings.incoming_dir / "pkg-2"
    shutil.copytree(kit["pkg2"], incoming)
    async with running(settings) as rig:
        original = Ota.report

        async def report(self: Ota, step: str, **body: Any) -> None:
            if step == "staged":
                raise StoreFull("store is full")
            await original(self, step, **body)

        monkeypatch.setattr(Ota, "report", report)
        with pytest.raises(StoreFull):
            await rig.ota.scan(asyncio.Event())
        trial = rig.models.read().trial
        assert trial is not None
        assert trial.version == "2"
