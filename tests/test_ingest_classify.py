"""Ingest's classification of one batch (pure logic): every message becomes a reading or a dead
letter with a reason, whatever a check does; and its pacing against a failing store."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from agent.base.errors import StoreUnavailable
from agent.base.records import Delivery, reading_id
from agent.config.settings import Settings
from agent.flows import ingest
from agent.routing.outbound import Topics
from agent.store.writer import Store
from tests.harness import Mosquitto, publish_readings


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
    batch = [Delivery("s/1", b'{"celsius": 1}', 1, 1),
             Delivery("s/2", b'{"tag": "boom"}', 2, 1),
             Delivery("s/3", b'[1]', 3, 1)]
    readings, dead = taker.classify(batch, 1.0)
    assert [r.topic for r in readings] == ["s/1"]
    reasons = {letter.topic: letter.reason for letter, _ in dead}
    assert reasons["s/2"] == ("ingest could not check the payload: RecursionError: maximum "
                              "recursion depth exceeded")
    assert reasons["s/3"].startswith("payload fails the route's input schema")


def test_reading_ids_stay_what_they_were_and_follow_a_reload(tmp_path: Path) -> None:
    """A reading's id is the sha256 of length-prefixed device id, topic and payload, cut to 32
    hex digits: pinned here, because the cloud drops duplicates by it across agent versions.
    Ingest works out each topic's route and id prefix once; a reload that moves a topic to
    another route is followed at once."""
    assert reading_id("gw-1", "sensors/a/temperature", b'{"celsius": 21.5}') == \
        "cb5845ac6705614341173cedece7ea08"

    def settings(topics: list[str]) -> Settings:
        return Settings(agent={"device_id": "gw-1", "state_dir": tmp_path},
                        model={"path": tmp_path / "m.gguf"},
                        routes=[{"name": "t", "topics": topics, "instruction": "Classify."}])

    taker = ingest.Ingest(settings(["sensors/#"]), None,  # type: ignore[arg-type]
                          Topics("edge", "gw-1"))
    batch = [Delivery("sensors/a/temperature", b'{"celsius": 21.5}', 1, 1)] * 2
    readings, dead = taker.classify(batch, 1.0)
    assert [r.id for r in readings] == ["cb5845ac6705614341173cedece7ea08"] * 2
    assert not dead
    asyncio.run(taker.apply(settings(["other/#"])))
    readings, dead = taker.classify(batch[:1], 1.0)
    assert not readings
    assert [letter.reason for letter, _ in dead] == [
        "no route takes this topic"]
    assert dead[0][0].id == "cb5845ac6705614341173cedece7ea08"


def test_a_failing_store_paces_ingest_reconnects_by_the_link_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that fails with an I/O error (StoreUnavailable, a kind of StoreFull) is not a
    full one: ingest does not wait for room (which returns at once) and reconnect in a tight
    loop, but backs off like after a broken link. Real mosquitto; the store's ingest raises."""
    broker = Mosquitto("local", tmp_path).start()
    try:
        settings = Settings(
            agent={"device_id": "gw", "state_dir": tmp_path},
            model={"path": tmp_path / "m.gguf"},
            local_broker={"port": broker.port, "reconnect_min_s": 0.5, "reconnect_max_s": 2.0},
            routes=[{"name": "t", "topics": ["s/#"], "instruction": "Classify."}],
        )

        async def scenario() -> int:
            store = await Store.open(settings.store_path)

            async def failing(*args: Any) -> None:
                raise StoreUnavailable("disk I/O error")

            monkeypatch.setattr(store, "ingest", failing)
            taker = ingest.Ingest(settings, store, Topics("edge", "gw"))
            task = asyncio.create_task(taker.run(), name="ingest")
            try:
                for _ in range(4):
                    await asyncio.to_thread(
                        publish_readings, broker.port, [("s/1", b'{"celsius": 1}')])
                await asyncio.sleep(3.0)  # a negative: count the reconnects in this time
                return taker.connects
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await store.close()

        connects = asyncio.run(scenario())
    finally:
        broker.kill()
    # Backoff 0.5 s doubling to 2 s: a handful in 3 s; the tight loop made hundreds.
    assert 1 <= connects <= 8, connects
