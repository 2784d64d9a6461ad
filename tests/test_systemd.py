"""The unit file, checked by systemd's own tools: `systemd-analyze security --offline=yes` rates
its exposure at 1.2 or lower (1.1 before a candidate worker needed sched_setscheduler, issue
16), and `systemd-analyze verify` prints nothing for it as
tools/install.sh installs it (into a temporary root, so the ExecStart binary really exists)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edge-agent.service"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"

needs_analyze = pytest.mark.skipif(not Path(ANALYZE).exists(),
                                   reason="systemd-analyze is not installed (Debian: systemd)")


@needs_analyze
def test_unit_exposure_is_at_most_1_2() -> None:
    """With MemoryDenyWriteExecute=, ProcSubset=pid and ~@resources the unit rated 1.1; the one
    call of @resources allowed back (sched_setscheduler, for a candidate's SCHED_IDLE) costs
    the 0.1 of that item, and nothing else may."""
    proc = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for edge-agent\.service: ([0-9.]+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    exposure = float(found.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= 1.2
    allowed_back = [line.split("=", 1)[1].split() for line in UNIT.read_text().splitlines()
                    if line.startswith("SystemCallFilter=") and "@" not in line]
    assert allowed_back == [["sched_setscheduler"]]


@needs_analyze
def test_installed_unit_verifies_clean(tmp_path: Path) -> None:
    """tools/install.sh --root installs package, unit, config and credstore; verify is silent."""
    root = tmp_path / "root"
    # systemd's own units (sysinit.target, ...) that verify resolves dependencies against.
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    # ExecReload's /bin/kill, which every Debian system has (util-linux).
    (root / "bin").mkdir()
    shutil.copy2("/bin/kill", root / "bin" / "kill")
    env = dict(os.environ, EDGE_AGENT_PIP_OPTS="--no-deps")
    proc = subprocess.run(["bash", str(REPO / "tools" / "install.sh"), "--root", str(root)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.access(root / "opt/edge-agent/venv/bin/edge-agent", os.X_OK)
    # The venv's interpreter is the system's, not one under /root or /home (ProtectHome=yes
    # hides those from the service: 203/EXEC), whatever python3 is first on the PATH.
    interpreter = (root / "opt/edge-agent/venv/bin/python").resolve()
    assert not interpreter.is_relative_to("/root"), interpreter
    assert not interpreter.is_relative_to("/home"), interpreter
    installed = root / "etc/systemd/system/edge-agent.service"
    assert installed.read_bytes() == UNIT.read_bytes()
    assert (root / "etc/edge-agent/agent.toml").is_file()
    assert stat.S_IMODE((root / "etc/credstore").stat().st_mode) == 0o700

    verify = subprocess.run([ANALYZE, "verify", f"--root={root}", "edge-agent.service"],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout + verify.stderr == "", "systemd-analyze verify printed something"


def unit_settings() -> dict[str, list[str]]:
    """Every assignment of the unit, in order (ExecReload= and friends may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_restarts_on_failure_but_not_on_a_bad_config() -> None:
    """What the service must be: notify with watchdog, restart except on 78, bounded stop."""
    settings = {key: values[-1] for key, values in unit_settings().items()}
    assert settings["Type"] == "notify"
    assert settings["Restart"] == "on-failure"
    assert settings["RestartPreventExitStatus"] == "78"
    assert int(settings["WatchdogSec"]) > 0
    drain_s = 10  # agent.drain_timeout_s's default
    assert int(settings["TimeoutStopSec"]) > drain_s + 5
    assert settings["DynamicUser"] == "yes"
    assert "StartLimitBurst" in settings
    assert "StartLimitIntervalSec" in settings


def test_a_bad_config_is_refused_by_the_main_process_not_a_control_process() -> None:
    """RestartPreventExitStatus= covers the main process only: no ExecStartPre= may exit 78
    (a check-config there was restarted in a loop), `run` refuses the file itself."""
    settings = unit_settings()
    assert "ExecStartPre" not in settings
    [start] = settings["ExecStart"]
    assert " run --config " in start


def test_reload_checks_the_file_before_signalling_the_agent() -> None:
    """ExecReload= runs check-config before SIGHUP, so a refused file fails `systemctl reload`
    and the running agent is not signalled."""
    check, signal = unit_settings()["ExecReload"]
    assert check == "+/opt/edge-agent/venv/bin/edge-agent check-config /etc/edge-agent/agent.toml"
    assert signal == "/bin/kill -HUP $MAINPID"


def test_the_start_limit_leaves_room_for_manual_restarts() -> None:
    """The start limit counts manual restarts too: the budget must hold an operator's handful
    (say 5) and still let the watchdog's restarts through."""
    settings = {key: values[-1] for key, values in unit_settings().items()}
    assert int(settings["StartLimitBurst"]) >= 5 + 5
    assert int(settings["StartLimitIntervalSec"]) >= 300


def test_install_refuses_an_interpreter_the_service_cannot_see(tmp_path: Path) -> None:
    """An interpreter under /root (pyenv's, here) is hidden by ProtectHome=yes: install.sh
    stops with the reason instead of installing a venv the service cannot execute."""
    home = tmp_path / "root" / "python3"
    pyenv = Path(sys.base_prefix) / "bin" / "python3"
    if not pyenv.resolve().is_relative_to("/root"):
        pytest.skip(f"no interpreter under /root to try ({pyenv.resolve()})")
    env = dict(os.environ, EDGE_AGENT_PYTHON=str(pyenv))
    proc = subprocess.run(["bash", str(REPO / "tools" / "install.sh"), "--root", str(home.parent)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "which the unit's ProtectHome=yes hides" in proc.stderr
    assert not (home.parent / "opt/edge-agent/venv").exists()
