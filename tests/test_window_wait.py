"""A window that waits for more readings does not hold the pipeline (issue 16, item 4): other
routes' readings are answered during its wait, and the window still flushes with every reading
of its route once its wait is over; on real mosquitto, a real agent and real llama.cpp."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.base.records import Reading, reading_id
from agent.config.settings import Settings
from agent.flows.pipeline import Pipeline
from agent.inference.supervisor import InferenceWorker, identify
from agent.routing.outbound import Topics
from agent.routing.windows import OpenWindow, due_first
from agent.store.writer import Store
from tests.conftest import Rig
from tests.harness import CloudCollector, publish_readings, wait_until

LEVELS = """
[routes.output_schema]
type = "object"
required = ["level"]
additionalProperties = false
[routes.output_schema.properties.level]
enum = ["normal", "warning", "critical"]
"""

# A window route that waits 3 s for up to 4 readings, and a plain route ({priority}).
ROUTES = """
[[routes]]
name = "humidity"
topics = ["sensors/+/humidity"]
instruction = "Classify the humidity readings as normal, warning or critical."
max_tokens = 24
window_max_readings = 4
window_max_wait_ms = 3000
{levels}
[[routes]]
name = "temperature"
topics = ["sensors/+/temperature"]
instruction = "Classify the temperature reading as normal, warning or critical."
max_tokens = 24
priority = {priority}
{levels}
"""


def leased(store: Path) -> list[str]:
    """Ids of the readings leased now, in arrival order; read-only while the agent runs."""
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return [row[0] for row in conn.execute(
            "SELECT id FROM inbox WHERE leased = 1 ORDER BY seq")]
    finally:
        conn.close()


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize("priority", [0, 5])
def test_readings_of_other_routes_are_answered_while_a_window_waits(
    rig: Rig, priority: int
) -> None:
    """One humidity reading opens a window that waits 3 s; five temperature readings (of the
    window's priority, or higher) published during the wait are all answered before the
    window's result, and a second humidity reading published after them joins the window,
    which is answered once, covering both, no earlier than its wait allows."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    config = rig.config(routes=ROUTES.format(levels=LEVELS, priority=priority))
    config.write_text(config.read_text().replace("n_ctx = 512", "n_ctx = 1024"))
    agent = rig.agent(config)
    agent.wait_for_event("agent_ready")

    first = [("sensors/h0/humidity", json.dumps({"rh": 41}).encode())]
    plain = [(f"sensors/t{i}/temperature", json.dumps({"celsius": 20 + i}).encode())
             for i in range(5)]
    last = [("sensors/h1/humidity", json.dumps({"rh": 97}).encode())]

    def ids(batch: list[tuple[str, bytes]]) -> list[str]:
        return [reading_id("gw-test", topic, payload) for topic, payload in batch]

    publish_readings(rig.local.port, first)
    # The window is open (its reading leased) before anything else arrives.
    wait_until(lambda: leased(rig.store) == ids(first), 30, "the window's lease")
    publish_readings(rig.local.port, plain)
    publish_readings(rig.local.port, last)

    wait_until(lambda: len(collector.distinct_ids()) >= len(plain) + 1, 60,
               "the plain results and the window's")
    arrived = collector.results()
    routes = [body["route"] for body in arrived]
    assert routes == ["temperature"] * len(plain) + ["humidity"], routes
    assert sorted(body["id"] for body in arrived[:-1]) == sorted(ids(plain))
    assert all(body["status"] == "ok" for body in arrived)
    assert arrived[-1]["covers"] == ids(first) + ids(last)

    # The window waited its 3 s, counted from its first reading's lease (after its commit).
    committed = stamp(next(e for e in agent.events() if e.get("event") == "ingest_batch_committed"))
    flushed = stamp(agent.wait_for_event("window_recorded"))
    assert flushed - committed >= 3.0
    assert agent.terminate() == 0
    collector.stop()


# -- the pipeline in-process: a real store file and a real llama.cpp worker -------------------

SCHEMA = {"type": "object", "required": ["level"],
          "properties": {"level": {"enum": ["normal", "critical"]}}}


def settings(tmp_path: Path, model: Path, **window: int) -> Settings:
    """A window route "w" (priority 0) and a plain route "p" (priority 5)."""
    common = {"instruction": "Classify.", "max_tokens": 24, "output_schema": SCHEMA}
    return Settings(
        agent={"device_id": "gw", "state_dir": tmp_path},
        model={"path": model, "n_ctx": 2048, "n_threads": 1, "request_timeout_s": 60},
        pipeline={"max_attempts": 2, "retry_backoff_s": 0},
        routes=[{"name": "w", "topics": ["w/#"], **common, **window},
                {"name": "p", "topics": ["p/#"], "priority": 5, **common}],
    )


def reading(name: str, route: str) -> Reading:
    return Reading(name, f"{route}/1", json.dumps({"name": name}).encode(), 0.0, route,
                   5 if route == "p" else 0)


@asynccontextmanager
async def running(cfg: Settings) -> AsyncIterator[tuple[Store, asyncio.Event,
                                                         asyncio.Task[None]]]:
    """The store, the pipeline's stop event and its task; stopped and closed on the way out."""
    store = await Store.open(cfg.store_path)
    worker = InferenceWorker(cfg.model, await identify(cfg.model, "tiny"))
    await worker.start()
    stop = asyncio.Event()
    task = asyncio.create_task(Pipeline(cfg, store, worker, Topics("edge", "gw")).run(stop),
                               name="pipeline")
    try:
        yield store, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await worker.close()
        await store.close()


async def outbox_after(store: Store, n: int) -> list[dict[str, Any]]:
    """The outbox bodies in commit order once it holds `n` rows."""
    while True:
        store.outbox_changed.clear()  # before the check, so no commit is missed
        rows = await store.pending_outbox(100)
        if len(rows) >= n:
            return [json.loads(row.payload) for row in rows]
        await asyncio.wait_for(store.outbox_changed.wait(), 60)


async def until_leased(store: Store, ids: list[str]) -> None:
    await asyncio.to_thread(wait_until, lambda: leased(store.path) == ids, 30,
                            f"{ids} leased", interval_s=0.01)


def test_a_window_that_fills_while_other_routes_are_answered_is_answered_when_full(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Window of 3 with a 60 s wait: its first reading opens it; three plain readings and two
    more of its route come after. The plain ones are answered first, and the window is answered
    as soon as it is full, covering its three readings once each, long before its wait ends;
    nothing is left leased or in the inbox."""

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, int], list[str]]:
        cfg = settings(tmp_path, tiny_model, window_max_readings=3, window_max_wait_ms=60_000)
        async with running(cfg) as (store, _, _):
            await store.ingest([reading("w0", "w")], [])
            await until_leased(store, ["w0"])
            await store.ingest([reading(f"p{i}", "p") for i in range(3)], [])
            await store.ingest([reading("w1", "w"), reading("w2", "w")], [])
            bodies = await asyncio.wait_for(outbox_after(store, 4), 30)
            return bodies, await store.depths(), leased(store.path)

    bodies, depths, still = asyncio.run(scenario())
    assert [body["route"] for body in bodies] == ["p", "p", "p", "w"]
    assert sorted(body["id"] for body in bodies[:3]) == ["p0", "p1", "p2"]
    assert bodies[3]["covers"] == ["w0", "w1", "w2"]
    assert (depths["inbox"], depths["outbox"], still) == (0, 4, [])


def test_a_stop_answers_a_waiting_window_with_what_it_holds(
    tmp_path: Path, tiny_model: Path
) -> None:
    """A window of up to 4 with a 60 s wait holds two readings when the pipeline is asked to
    stop: the run ends without waiting the window out, one result covers both readings, and
    no reading is left leased or in the inbox."""

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, int], list[str]]:
        cfg = settings(tmp_path, tiny_model, window_max_readings=4, window_max_wait_ms=60_000)
        async with running(cfg) as (store, stop, task):
            await store.ingest([reading("w0", "w")], [])
            await until_leased(store, ["w0"])
            await store.ingest([reading("p0", "p"), reading("w1", "w")], [])
            await asyncio.wait_for(outbox_after(store, 1), 30)  # p0, while the window waits
            await until_leased(store, ["w0", "w1"])
            stop.set()
            await asyncio.wait_for(task, 30)
            return await outbox_after(store, 2), await store.depths(), leased(store.path)

    bodies, depths, still = asyncio.run(scenario())
    assert [body["id"] for body in bodies[:1]] == ["p0"]
    assert bodies[1]["covers"] == ["w0", "w1"]
    assert (depths["inbox"], depths["outbox"], still) == (0, 2, [])


# -- pure logic --------------------------------------------------------------------------------


def test_a_window_is_due_when_full_when_its_wait_is_over_or_when_its_route_changed(
    tmp_path: Path,
) -> None:
    cfg = settings(tmp_path, tmp_path / "m.gguf", window_max_readings=3, window_max_wait_ms=500)
    route = cfg.routes[0]
    window = OpenWindow("w", [reading("w0", "w")], deadline=10.0)
    assert (window.wants(route), window.due(route, 9.9), window.due(route, 10.0)) == (2, False,
                                                                                       True)
    window.readings += [reading("w1", "w"), reading("w2", "w")]
    assert (window.wants(route), window.due(route, 0.0)) == (0, True)
    one = OpenWindow("w", [reading("w0", "w")], deadline=10.0)
    assert one.due(None, 0.0)  # the route was removed by a reload
    assert one.due(cfg.routes[1], 0.0)  # ... or is no longer windowed
    high = OpenWindow("x", [reading("p0", "p")], deadline=20.0)
    late = OpenWindow("y", [reading("w3", "w")], deadline=30.0)
    assert [w.route for w in due_first([late, one, high])] == ["x", "w", "y"]
