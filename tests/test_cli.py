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
