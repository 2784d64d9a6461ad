"""Storage faults with the real agent process: a full database while sensors keep publishing,
and a corrupt database file at start."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from agent.store.views import read_counts, read_drops
from tests.conftest import Rig, flip_bytes
from tests.harness import TEST_ROUTES, CloudCollector, publish_readings, wait_until


def padded_readings(n: int, pad: int = 100) -> list[tuple[str, bytes]]:
    return [(f"sensors/s{i % 3}/temperature",
             json.dumps({"seq": i, "celsius": 20, "note": "x" * pad}).encode())
            for i in range(n)]


def test_full_database_stops_acking_keeps_everything_and_resumes_when_space_returns(
    rig: Rig,
) -> None:
    """With the database capped at 40 pages (an 8-page reserve) and the cloud down, 400
    readings fill the store: ingest stops acking (logged once, `ingest_paused`) and the local
    broker keeps the rest. When the cloud returns, delivered rows free pages, ingest resumes by
    itself, all 400 readings arrive, and the database passes integrity_check."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    rig.cloud.stop()
    agent = rig.agent(rig.config(
        extra="[store]\nmax_page_count = 40\nreserve_bytes = 32768\n"))
    agent.wait_for_event("agent_ready")
    published = padded_readings(400)
    publish_readings(rig.local.port, published)
    paused = agent.wait_for_event("ingest_paused", 60)
    assert "full" in str(paused["reason"])
    held = read_counts(rig.store)
    assert held["inbox"] + held["outbox"] < 400, "the cap was never reached"

    rig.cloud.start()
    agent.wait_for_event("ingest_resumed", 90)
    wait_until(lambda: len(collector.distinct_ids()) == 400, 180, "all 400 results")
    episodes = [e["event"] for e in agent.events()
                if e.get("event") in ("ingest_paused", "ingest_resumed")]
    print(f"disk full: held={held} episodes={episodes.count('ingest_paused')} "
          f"reason={paused['reason']!r}")
    # Each pause is logged once: pauses and resumptions alternate, whatever the retries.
    assert episodes == ["ingest_paused", "ingest_resumed"] * (len(episodes) // 2)
    assert agent.terminate() == 0
    conn = sqlite3.connect(rig.store)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    collector.stop()


def test_corrupt_database_at_start_is_quarantined_and_the_agent_serves_on_a_fresh_store(
    rig: Rig,
) -> None:
    """Bytes flipped in the stopped agent's database: the next start reports `store_quarantined`
    (critical) with where the file went, becomes ready on a fresh store, and new readings flow."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    agent = rig.agent()
    agent.wait_for_event("agent_ready")
    publish_readings(rig.local.port, padded_readings(20))
    wait_until(lambda: len(collector.distinct_ids()) == 20, 60, "20 results")
    assert agent.terminate() == 0
    flip_bytes(rig.store, 4096 * 2)

    again = rig.agent()
    report = again.wait_for_event("store_quarantined")
    again.wait_for_event("agent_ready")
    assert report["level"] == "critical"
    moved = Path(str(report["moved_to"]))
    assert moved.parent == rig.store.parent / "quarantine"
    assert (moved / "agent.db").exists()
    publish_readings(rig.local.port, [("sensors/s1/temperature", b'{"seq": 1000}')])
    wait_until(lambda: len(collector.distinct_ids()) == 21, 60, "a result from the fresh store")
    collector.stop()


def test_outbox_bound_during_an_outage_drops_oldest_and_reports_the_count(rig: Rig) -> None:
    """Cloud down: a result of a route with a 1 s TTL expires while it waits. Then, with room
    for 5 rows, 12 readings: the 5 newest results wait and 7 are dropped. When the cloud returns
    it gets those 5 and drop reports counting 7 for the route and 1 for `pressure/ttl`."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    rig.cloud.stop()
    routes = TEST_ROUTES + """
[[routes]]
name = "pressure"
topics = ["sensors/+/pressure"]
instruction = "Classify."
max_tokens = 8
ttl_s = 1.0
"""
    agent = rig.agent(rig.config(extra="[store]\nmax_outbox_rows = 5\n", routes=routes))
    agent.wait_for_event("agent_ready")
    publish_readings(rig.local.port, [("sensors/p/pressure", b'{"seq": 0}')])
    wait_until(lambda: read_drops(rig.store).get("pressure/ttl") == 1, 60,
               "the pressure result expired")
    assert read_counts(rig.store)["outbox"] == 0
    published = padded_readings(12, pad=0)
    publish_readings(rig.local.port, published)
    wait_until(lambda: read_counts(rig.store)["inbox"] == 0, 90, "all readings inferred")
    wait_until(lambda: read_counts(rig.store)["dropped"] == 8, 30, "8 drops counted")
    assert read_counts(rig.store)["outbox"] == 5

    rig.cloud.start()
    wait_until(lambda: len(collector.results("drops")) >= 1 and len(collector.results()) >= 5,
               60, "5 results and a drops report")
    kept = sorted(json.loads(json.dumps(r["source"]["payload"]))["seq"]
                  for r in collector.results())
    assert kept == [7, 8, 9, 10, 11]
    reports = collector.results("drops")
    assert sum(r["dropped"].get("temperature", 0) for r in reports) == 7
    assert sum(r["dropped"].get("pressure/ttl", 0) for r in reports) == 1
    collector.stop()


def test_refuse_input_at_the_outbox_bound_leaves_readings_with_the_broker_until_room_returns(
    rig: Rig,
) -> None:
    """Cloud down, room for 5 rows, when_full = refuse_input and batches of at most 4: the bound
    is checked before each batch, so the store takes at most 5 + 3 rows, then ingest stops
    acking and the local broker keeps the rest of the 22; nothing is dropped, the store does not
    grow while paused, and when the cloud returns all 22 readings are delivered."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    rig.cloud.stop()
    config = rig.config(extra='[store]\nmax_outbox_rows = 5\nwhen_full = "refuse_input"\n')
    config.write_text(config.read_text().replace(
        "[local_broker]\n", "[local_broker]\nbatch_max_messages = 4\n"))
    agent = rig.agent(config)
    agent.wait_for_event("agent_ready")
    publish_readings(rig.local.port, padded_readings(22, pad=0))
    paused = agent.wait_for_event("ingest_paused", 60)
    assert paused["outbox_bound"] is True

    def stored() -> int:
        counts = read_counts(rig.store)
        return counts["inbox"] + counts["outbox"]

    held = stored()
    assert 5 <= held <= 8, f"{held} rows stored past a bound of 5 with batches of 4"
    time.sleep(1.0)
    assert stored() == held, "the store grew while ingest was paused"
    assert read_counts(rig.store)["dropped"] == 0

    rig.cloud.start()
    wait_until(lambda: len(collector.distinct_ids()) == 22, 120, "all 22 results")
    assert read_counts(rig.store)["dropped"] == 0
    agent.wait_for_event("ingest_resumed", 60)
    collector.stop()
