"""The unit file, checked by systemd's own tools: `systemd-analyze security --offline=yes` rates
its exposure at 2.0 or lower, and `systemd-analyze verify` prints nothing for it as
tools/install.sh installs it (into a temporary root, so the ExecStart binary really exists)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edge-agent.service"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"

needs_analyze = pytest.mark.skipif(not Path(ANALYZE).exists(),
                                   reason="systemd-analyze is not installed (Debian: systemd)")


@needs_analyze
def test_unit_exposure_is_at_most_2() -> None:
    proc = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for edge-agent\.service: ([0-9.]+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    exposure = float(found.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= 2.0


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
    installed = root / "etc/systemd/system/edge-agent.service"
    assert installed.read_bytes() == UNIT.read_bytes()
    assert (root / "etc/edge-agent/agent.toml").is_file()
    assert stat.S_IMODE((root / "etc/credstore").stat().st_mode) == 0o700

    verify = subprocess.run([ANALYZE, "verify", f"--root={root}", "edge-agent.service"],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout + verify.stderr == "", "systemd-analyze verify printed something"


def test_unit_restarts_on_failure_but_not_on_a_bad_config() -> None:
    """What the service must be: notify with watchdog, restart except on 78, bounded stop."""
    text = UNIT.read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify"
    assert settings["Restart"] == "on-failure"
    assert settings["RestartPreventExitStatus"] == "78"
    assert int(settings["WatchdogSec"]) > 0
    drain_s = 10  # agent.drain_timeout_s's default
    assert int(settings["TimeoutStopSec"]) > drain_s + 5
    assert settings["DynamicUser"] == "yes"
    assert "StartLimitBurst" in settings
    assert "StartLimitIntervalSec" in settings
