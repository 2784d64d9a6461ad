"""Ingest's classification of one batch (pure logic): every message becomes a reading or a dead
letter with a reason, whatever a check does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import ingest
from agent.config import Settings
from agent.messages import Topics
from agent.records import IncomingMessage


def test_a_check_that_raises_dead_letters_that_message_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payload on which a check raises an error nobody foresaw becomes a dead letter naming
    the error, so it is acked and cannot loop through redeliveries; the rest of the batch is
    classified as usual."""
    settings = Settings(
        agent={"device_id": "gw", "state_dir": tmp_path},
        model={"path": tmp_path / "m.gguf"},
        routes=[{"name": "t", "topics": ["s/#"], "instruction": "Classify.",
                 "input_schema": {"type": "object"}}],
    )
    real = ingest.schema_violation

    def fragile(value: Any, schema: dict[str, Any]) -> str | None:
        if isinstance(value, dict) and value.get("tag") == "boom":
            raise RecursionError("maximum recursion depth exceeded")
        return real(value, schema)

    monkeypatch.setattr(ingest, "schema_violation", fragile)
    taker = ingest.Ingest(settings, None, Topics("edge", "gw"))  # type: ignore[arg-type]
    batch = [IncomingMessage("s/1", b'{"celsius": 1}', 1, 1),
             IncomingMessage("s/2", b'{"tag": "boom"}', 2, 1),
             IncomingMessage("s/3", b'[1]', 3, 1)]
    readings, dead = taker.classify(batch, 1.0)
    assert [r.topic for r in readings] == ["s/1"]
    reasons = {letter.topic: letter.reason for letter, _ in dead}
    assert reasons["s/2"] == ("ingest could not check the payload: RecursionError: maximum "
                              "recursion depth exceeded")
    assert reasons["s/3"].startswith("payload fails the route's input schema")
