"""The whole path on real parts: mosquitto brokers, the agent process, llama.cpp, SQLite."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

from agent.store.views import read_counts, read_dead_letters
from tests.conftest import Rig
from tests.harness import CloudCollector, publish_readings, wait_until


def readings(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [
        (f"sensors/s{i % 4}/temperature", json.dumps({"seq": i, "celsius": 20 + i % 30}).encode())
        for i in range(start, start + n)
    ]


def test_readings_buffered_while_cloud_is_down_are_all_delivered_when_it_returns(
    rig: Rig,
) -> None:
    """200 readings published while the cloud broker is down become 200 outbox rows, and all 200
    reach a cloud subscriber with distinct ids and the model's sha256 once the broker starts."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()  # registers its persistent session
    rig.cloud.stop()
    agent = rig.agent()
    ready = agent.wait_for_event("agent_ready")
    publish_readings(rig.local.port, readings(200))
    wait_until(lambda: read_counts(rig.store)["outbox"] == 200, 120, "200 outbox rows")
    assert read_counts(rig.store)["inbox"] == 0

    rig.cloud.start()
    wait_until(lambda: len(collector.results()) >= 200, 60, "200 results at the cloud")
    results = collector.results()
    assert len({r["id"] for r in results}) == 200
    sha = agent.wait_for_event("model_answered")["sha256"]
    assert {r["model"]["sha256"] for r in results} == {sha}
    assert {json.dumps(r["source"]["payload"], sort_keys=True) for r in results} == {
        json.dumps(json.loads(p), sort_keys=True) for _, p in readings(200)
    }
    assert all(r["status"] == "ok" and r["output"]["level"] in
               ("normal", "warning", "critical") for r in results)
    wait_until(lambda: read_counts(rig.store)["outbox"] == 0, 30, "outbox drained")
    assert read_counts(rig.store)["delivered"] == 200
    assert ready["startup_s"] < 30
    collector.stop()


def test_agent_killed_midway_still_delivers_every_reading(rig: Rig) -> None:
    """A SIGKILL halfway through 200 readings loses nothing: after a restart all 200 distinct
    ids arrive; duplicates are allowed, and counted."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    agent = rig.agent()
    agent.wait_for_event("agent_ready")
    publish_readings(rig.local.port, readings(200))
    wait_until(lambda: len(collector.results()) >= 60, 60, "a third of the results")
    agent.kill()
    partial = len(collector.distinct_ids())
    assert partial < 200, "the kill came too late to test anything"

    rig.agent().wait_for_event("agent_ready")
    wait_until(lambda: len(collector.distinct_ids()) == 200, 120, "all 200 distinct ids")
    ids = Counter(r["id"] for r in collector.results())
    duplicates = sum(count - 1 for count in ids.values())
    print(f"delivered before kill={partial} distinct=200 duplicates={duplicates}")
    assert set(ids) == {r["id"] for r in collector.results()}
    collector.stop()


def test_malformed_payload_is_dead_lettered_acked_and_the_stream_continues(rig: Rig) -> None:
    """A payload that is not JSON goes to the dead-letter table with its reason and a report to
    the cloud; the readings after it still produce results; after a restart it is not redelivered
    (it was acked)."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    agent = rig.agent()
    agent.wait_for_event("agent_ready")
    batch = [*readings(2), ("sensors/s9/temperature", b"{\"celsius\": 21"), *readings(2, 2)]
    publish_readings(rig.local.port, batch)
    wait_until(lambda: len(collector.results()) >= 4 and collector.results("deadletter"),
               60, "4 results and a dead letter")
    letters = read_dead_letters(rig.store)
    assert len(letters) == 1
    assert letters[0]["topic"] == "sensors/s9/temperature"
    assert letters[0]["reason"].startswith("malformed JSON")
    report = collector.results("deadletter")[0]
    assert report["reason"] == letters[0]["reason"]
    assert report["id"] == letters[0]["id"]

    assert agent.terminate() == 0
    again = rig.agent()
    again.wait_for_event("agent_ready")
    # A marker that must come after any redelivery of an unacked message.
    publish_readings(rig.local.port, readings(1, 100))
    wait_until(lambda: len(collector.results()) >= 5, 60, "the marker's result")
    received = [e for e in again.events() if e.get("event") == "ingest_batch_committed"]
    assert sum(e["messages"] for e in received) == 1, "a message was redelivered: it was not acked"
    collector.stop()


def test_bad_config_exits_78_and_names_the_key(rig: Rig) -> None:
    """A configuration with a wrong value makes `run` exit 78 with the key's dotted path."""
    config = rig.config(extra="[pipeline]\nmax_attempts = \"many\"\n")
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert "pipeline.max_attempts" in proc.stderr


def test_agent_started_before_the_local_broker_becomes_ready_when_it_appears(rig: Rig) -> None:
    """With no local broker the agent keeps retrying; once mosquitto starts on the configured
    port the agent subscribes, is ready, and a reading published then produces a result."""
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    agent = rig.agent()
    agent.wait_for_event("ingest_link_failed", 60)
    assert not [e for e in agent.events() if e.get("event") == "agent_ready"]
    rig.local.start()
    agent.wait_for_event("agent_ready", 30)
    publish_readings(rig.local.port, readings(3))
    wait_until(lambda: len(collector.distinct_ids()) == 3, 60, "3 results")
    collector.stop()


def test_sigterm_with_the_cloud_down_stops_promptly_and_keeps_unsent_results(rig: Rig) -> None:
    """SIGTERM while the cloud is unreachable: exit 0 well within the drain deadline, every
    result still in the outbox; the next run delivers them."""
    rig.local.start()
    agent = rig.agent()
    agent.wait_for_event("agent_ready")
    publish_readings(rig.local.port, readings(20))
    wait_until(lambda: read_counts(rig.store)["outbox"] == 20, 60, "20 outbox rows")
    started = time.monotonic()
    assert agent.terminate(timeout_s=30) == 0
    assert time.monotonic() - started < 10  # drain_timeout_s in the test config
    assert read_counts(rig.store)["outbox"] == 20

    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    rig.agent().wait_for_event("agent_ready")
    wait_until(lambda: len(collector.distinct_ids()) == 20, 60, "the 20 kept results")
    collector.stop()
