"""What root hands the agent is the agent's (issue 14, item 4): `edge-agent model install` run
as root gives the package to the owner of the state directory (the unit's dynamic user), and
a package the agent cannot remove is logged and set aside, never skipped silently and read
again at every start. Real files, real permissions: the agent's side runs as another user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MINIMAL_CONFIG
from tests.otakit import keypair, package

REPO = Path(__file__).resolve().parent.parent
AGENT_UID = 65534  # nobody: stands in for the unit's dynamic user

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as others")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's own base directory is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="edge-agent-owner-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def as_agent(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={AGENT_UID}", f"--regid={AGENT_UID}",
                           "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def owners(directory: Path) -> set[int]:
    return {p.stat().st_uid for p in [directory, *directory.rglob("*")]}


def test_a_root_run_model_install_hands_the_package_to_the_agents_user(
    shared_dir: Path, tmp_path: Path
) -> None:
    """After `model install` as root, every file of the package in incoming/ belongs to the
    state directory's owner, and that user can remove it."""
    key, public = keypair(tmp_path)
    pkg = package(tmp_path, key, "2", seed=2)
    state = shared_dir / "state"
    state.mkdir()
    os.chown(state, AGENT_UID, AGENT_UID)
    config = shared_dir / "agent.toml"
    config.write_text(MINIMAL_CONFIG + f"[ota]\ntrusted_keys = [{json.dumps(public)}]\n")
    proc = subprocess.run([sys.executable, "-m", "agent", "model", "install", str(pkg),
                           "--config", str(config)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [installed] = (state / "incoming").iterdir()
    assert owners(state / "incoming") == {AGENT_UID}
    removed = as_agent(sys.executable, "-c", "import shutil, sys; shutil.rmtree(sys.argv[1])",
                       str(installed))
    assert removed.returncode == 0, removed.stderr
    assert not installed.exists()


def test_a_package_the_agent_cannot_remove_is_logged_and_set_aside(shared_dir: Path) -> None:
    """A root-owned package in the agent's incoming/ cannot be removed by the agent: that is
    logged as model_package_not_removed naming the owner, and the package is renamed to a
    hidden name that the next scan passes over."""
    probe = as_agent(sys.executable, "-c", "import agent.ota")
    if probe.returncode != 0:  # e.g. a clone under a 0700 directory, as fresh-clone-check makes
        pytest.skip(f"uid {AGENT_UID} cannot import the agent from {REPO}: "
                    f"{probe.stderr.strip().splitlines()[-1:]}")
    incoming = shared_dir / "incoming"
    incoming.mkdir()
    os.chown(incoming, AGENT_UID, AGENT_UID)
    stuck = incoming / "tiny-2"
    stuck.mkdir()
    (stuck / "model.gguf").write_bytes(b"GGUF")  # root's, in a root-owned directory
    proc = as_agent(sys.executable, "-c",
                    "import sys; from pathlib import Path; from agent.service import logs; "
                    "from agent.ota.updates import discard; "
                    "logs.configure(); discard(Path(sys.argv[1]))", str(stuck))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [event] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert event["event"] == "model_package_not_removed"
    assert event["owner_uid"] == 0
    assert event["agent_uid"] == AGENT_UID
    assert event["set_aside"] is True
    assert not stuck.exists()
    [aside] = incoming.iterdir()
    assert aside.name.startswith(".unremovable-tiny-2-")
    assert str(aside) == event["left_at"]


def test_a_leftover_the_agent_cannot_fully_remove_is_logged_and_never_reported_removed(
    shared_dir: Path
) -> None:
    """Start-up's leftover cleanup, run as the agent's user, removes what it can (a root-owned
    file in the agent's directory), logs ota_directory_not_removed naming each entry that
    stayed and why, does not raise, and lists as removed only the leftover that is gone."""
    probe = as_agent(sys.executable, "-c", "import agent.ota")
    if probe.returncode != 0:
        pytest.skip(f"uid {AGENT_UID} cannot import the agent from {REPO}: "
                    f"{probe.stderr.strip().splitlines()[-1:]}")
    ota = shared_dir / "ota"
    models = ota / "models"
    models.mkdir(parents=True)
    staging = models / ".staging-3-123"
    stuck = staging / "root-owned"
    stuck.mkdir(parents=True)
    (stuck / "model.gguf").write_bytes(b"GGUF")  # root's, in a root-owned directory
    (staging / "manifest.json").write_bytes(b"{}")  # root's, in the agent's directory
    unknown = models / "7"
    unknown.mkdir()
    (unknown / "model.gguf").write_bytes(b"GGUF")
    for path in (ota, models, staging, unknown, unknown / "model.gguf"):
        os.chown(path, AGENT_UID, AGENT_UID)
    proc = as_agent(sys.executable, "-c",
                    "import json, sys; from pathlib import Path; from agent.service import logs; "
                    "from agent.ota.state import ModelStore, OtaState; logs.configure(); "
                    "removed = ModelStore(Path(sys.argv[1])).remove_leftovers(OtaState()); "
                    "print(json.dumps({'removed': removed}))", str(ota))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    event, result = [json.loads(line) for line in proc.stdout.splitlines()]
    assert event["event"] == "ota_directory_not_removed"
    assert event["level"] == "error"
    assert event["path"] == str(staging)
    assert event["what"] == "leftover of an interrupted install"
    assert event["agent_uid"] == AGENT_UID
    assert event["errors"] == [f"{stuck / 'model.gguf'}: Permission denied",
                               f"{stuck}: Directory not empty",
                               f"{staging}: Directory not empty"]
    assert event["failures"] == 3
    assert result == {"removed": ["7"]}
    assert not unknown.exists()
    assert not (staging / "manifest.json").exists()
    assert (stuck / "model.gguf").read_bytes() == b"GGUF"
