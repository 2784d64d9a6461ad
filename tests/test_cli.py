"""The command line's exit paths: a defect that escapes the app ends in one logged event."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import structlog

from agent import app
from agent.cli import main
from agent.config.settings import Settings
from tests.conftest import MINIMAL_CONFIG


def test_an_exception_group_out_of_the_app_is_logged_as_agent_failed_with_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error that escapes the app's TaskGroup arrives as an ExceptionGroup, which is not an
    AgentError: it still ends in `agent_failed` naming each cause, with exit code 1, not a
    bare traceback."""
    config = tmp_path / "agent.toml"
    config.write_text(MINIMAL_CONFIG)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")

    async def broken(settings: Settings, config_path: Path | None = None) -> None:
        raise ExceptionGroup("unhandled errors in a TaskGroup",
                             [ValueError("Out of range float values are not JSON compliant")])

    out = io.StringIO()

    def configure(level: str = "info") -> None:
        # The agent's processors, into a buffer, and no logger cached past this test.
        structlog.configure(
            processors=[structlog.processors.add_log_level,
                        structlog.processors.format_exc_info,
                        structlog.processors.JSONRenderer()],
            logger_factory=structlog.PrintLoggerFactory(file=out),
            cache_logger_on_first_use=False)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(app, "run", broken)
    monkeypatch.setattr(main.logs, "configure", configure)
    try:
        assert main.main(["run", "--config", str(config)]) == 1
    finally:
        structlog.reset_defaults()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    [failed] = [e for e in events if e["event"] == "agent_failed"]
    assert failed["error"] == "ValueError: Out of range float values are not JSON compliant"
    assert failed["error_type"] == "ExceptionGroup"
    assert "Traceback" in failed["exception"]


def test_model_list_prints_a_line_per_version_with_its_golden_accuracy_and_json_the_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`model list`: the configured base, then each installed or failed version in version
    order with its role and the golden figures the agent recorded; --json: the state file."""
    from agent.config.settings import load
    from agent.ota.state import ModelStore, OtaState

    config = tmp_path / "agent.toml"
    config.write_text(MINIMAL_CONFIG)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    figures = {"route": "t", "file": "eval.jsonl", "n": 300, "right": 296, "accuracy": 0.9867,
               "floor": 0.95, "misses": []}

    def record(state: OtaState) -> None:
        state.installed = {
            "10": {"name": "triage", "file": "t-q8_0.gguf", "size": 189440,
                   "installed_at": 1764770400.0,
                   "golden": {"canary": [figures], "probation": [{**figures, "n": 50,
                                                                   "right": 50,
                                                                   "accuracy": 1.0}]}},
            "9": {"name": "triage", "file": "t-old.gguf", "size": 2_000_000,
                  "installed_at": 1764684000.0}}
        state.failed = {"11": {"reason": "accuracy 0.62 on 300 golden readings",
                               "step": "canary", "figures": {"golden": [
                                   {**figures, "right": 186, "accuracy": 0.62}]}}}
        state.active, state.previous = "10", "9"

    ModelStore(load(config).ota_dir).update(record)
    assert main.main(["model", "list", "--config", str(config)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "base     model.gguf 0 (the configured [model] file)",
        "9        triage t-old.gguf 2.00 MB, installed 2025-12-02 14:00:00 UTC, previous",
        "10       triage t-q8_0.gguf 0.19 MB, installed 2025-12-03 14:00:00 UTC, active; golden "
        "canary t 0.987 (296/300, floor 0.95), probation t 1.000 (50/50, floor 0.95)",
        "11       not installed, FAILED at canary: accuracy 0.62 on 300 golden readings; golden "
        "canary t 0.620 (186/300, floor 0.95)"]
    assert main.main(["model", "list", "--json", "--config", str(config)]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert (raw["active"], raw["installed"]["10"]["golden"]["canary"]) == ("10", [figures])
