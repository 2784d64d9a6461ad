"""check-config passes exactly the files `run` starts with (issue 14, item 2): a missing TLS
file or a missing model is exit 78 from both, naming the key and the path, before either
touches the network; and check-config warns when the deadlines make the watchdog and the
worker's own deadline disagree (item 7)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.preflight import advice
from agent.config.settings import load
from tests.conftest import MINIMAL_CONFIG

REPO = Path(__file__).resolve().parent.parent


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize("command", [["check-config"], ["run", "--config"]])
def test_a_missing_tls_ca_file_is_exit_78_from_check_config_and_run(
    tmp_path: Path, command: list[str]
) -> None:
    """A TLS ca_file that is not there is refused by check-config as by run, naming the file."""
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    config = tmp_path / "agent.toml"
    config.write_text(MINIMAL_CONFIG + '[cloud_broker]\ntls = true\nca_file = "absent-ca.pem"\n')
    proc = edge_agent(*command, str(config))
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert "cloud_broker" in proc.stderr
    assert "absent-ca.pem" in proc.stderr


@pytest.mark.parametrize("command", [["check-config"], ["run", "--config"]])
def test_a_missing_model_file_is_exit_78_naming_the_path(
    tmp_path: Path, command: list[str]
) -> None:
    """No model file and no installed update is a bad configuration (78, not restarted), from
    check-config as from run, and the message names the path to put the model at."""
    config = tmp_path / "agent.toml"
    config.write_text(MINIMAL_CONFIG)
    proc = edge_agent(*command, str(config))
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert f"model.path: the model file {tmp_path / 'model.gguf'} does not exist" in proc.stderr


def test_an_active_installed_update_stands_in_for_a_missing_model_file(tmp_path: Path) -> None:
    """When an OTA version is active and its file is in place, the [model] file may be gone:
    the agent serves the installed version, so check-config passes."""
    config = tmp_path / "agent.toml"
    config.write_text(MINIMAL_CONFIG)
    ota = tmp_path / "state" / "ota"
    (ota / "models" / "2").mkdir(parents=True)
    (ota / "models" / "2" / "m.gguf").write_bytes(b"GGUF")
    (ota / "state.json").write_text(json.dumps({
        "active": "2", "installed": {"2": {"name": "m", "file": "m.gguf", "sha256": "0",
                                           "size": 4, "n_ctx": 256, "installed_at": 0}}}))
    proc = edge_agent("check-config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (ota / "models" / "2" / "m.gguf").unlink()
    proc = edge_agent("check-config", str(config))
    assert proc.returncode == 78, proc.stdout + proc.stderr


def test_the_default_deadlines_let_the_worker_deadline_act_before_the_watchdog(
    tmp_path: Path
) -> None:
    """With the defaults a hung worker is killed by model.request_timeout_s before the loop
    counts as stalled; inverted values are accepted but check-config warns about them."""
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    config = tmp_path / "agent.toml"
    config.write_text(MINIMAL_CONFIG)
    assert advice(load(config)) == []
    config.write_text(MINIMAL_CONFIG + "[service]\nstall_timeout_s = 10\n")
    proc = edge_agent("check-config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "warning: service.stall_timeout_s (10)" in proc.stderr


def test_the_example_configuration_deadlines_agree() -> None:
    """configs/agent.toml's deadlines are the defaults' and pass the same rule."""
    text = (REPO / "configs" / "agent.toml").read_text()
    from agent.config.sections import ModelSection, ServiceSection

    model = ModelSection(path=Path("m.gguf"))
    assert f"request_timeout_s = {model.request_timeout_s}" in text
    assert f"stall_timeout_s = {ServiceSection().stall_timeout_s}" in text
