"""Configuration: bad files name the key and exit 78; the environment overrides the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config.settings import ConfigError, load
from tests.conftest import MINIMAL_CONFIG as GOOD


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_example_config_in_the_repository_is_valid() -> None:
    settings = load(Path(__file__).parent.parent / "configs" / "agent.toml")
    assert [route.name for route in settings.routes] == ["temperature", "vibration", "wear"]


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    settings = load(write(tmp_path, GOOD))
    assert settings.model.path == tmp_path / "model.gguf"
    assert settings.store_path == tmp_path / "state" / "agent.db"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (GOOD.replace('device_id = "gw-1"', 'device_id = "gw 1/#"'), "agent.device_id"),
        (GOOD + "[cloud_broker]\nhots = \"x\"\n", "cloud_broker.hots: unknown key"),
        (GOOD.replace('topics = ["sensors/#"]', 'topics = ["a/#/b"]'), "routes[0]"),
        (GOOD.replace('instruction = "Classify."', ""), "routes[0].instruction: required"),
        (GOOD + "output_schema = { type = 12 }\n", "routes[0]: Value error, output_schema"),
        (GOOD.replace("[model]\npath", "[model]\nn_ctx = -1\npath"), "model.n_ctx"),
        (GOOD + "[store]\nhistory_max_rows = -1\n", "store.history_max_rows"),
        (GOOD + "[store]\nhistory_max_rows = \"all\"\n", "store.history_max_rows"),
        ("[agent\n", "not valid TOML"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path: Path, change: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load(write(tmp_path, change))


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_CLOUD_BROKER__PORT", "9999")
    monkeypatch.setenv("EDGE_AGENT_CLOUD_BROKER__PASSWORD", "s3cret")
    settings = load(write(tmp_path, GOOD + "[cloud_broker]\nport = 1234\n"))
    assert settings.cloud_broker.port == 9999
    assert settings.cloud_broker.password is not None
    assert settings.cloud_broker.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_check_config_exits_78_naming_the_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('name = "t"', 'name = "t"\nmax_tokens = 0'))
    proc = subprocess.run([sys.executable, "-m", "agent", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert str(path) in proc.stderr
    assert "routes[0].max_tokens" in proc.stderr


def test_check_config_exits_78_naming_a_bad_history_bound(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "[store]\nhistory_max_rows = -5\n")
    proc = subprocess.run([sys.executable, "-m", "agent", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert "store.history_max_rows" in proc.stderr
    assert load(write(tmp_path, GOOD + "[store]\nhistory_max_rows = 0\n")).store \
        .history_max_rows == 0
    assert load(write(tmp_path, GOOD)).store.history_max_rows == 10_000


def test_missing_file_exits_78(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "agent", "check-config",
                           str(tmp_path / "nope.toml")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 78
    assert "nope.toml" in proc.stderr
