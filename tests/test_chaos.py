"""Nothing lost under chaos: the agent SIGKILLed at random moments and the cloud broker stopped
and started at random, with tools/chaos.py on real brokers, the real agent and llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import Mosquitto, publish_readings, wait_until
from tools.chaos import order_violations, run
from tools.cloud_ingest import CloudIngest, report


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ten_sigkills_and_cloud_outages_lose_nothing_and_keep_stream_order(tmp_path: Path) -> None:
    """400 readings on 4 streams while the agent is SIGKILLed 10 times and the cloud broker
    goes down and up: every reading's id reaches the cloud consumer, none out of its stream's
    order; duplicates are allowed (and printed)."""
    summary = run(kills=10, readings=400, streams=4, seed=11, workdir=tmp_path, log=False)
    print(summary.line())
    assert summary.published == 400
    assert summary.lost == 0
    assert summary.delivered == 400
    assert summary.order_violations == 0
    assert summary.elapsed_s < 240


def test_order_checker_counts_a_reading_that_arrives_after_a_later_one() -> None:
    """The checker is not vacuous: stream 0 arriving 0, 2, 1 is one violation; stream 1 is fine."""
    def body(stream: int, seq: int) -> dict[str, object]:
        return {"source": {"payload": {"stream": stream, "seq": seq}}}

    bodies = [body(0, 0), body(1, 0), body(0, 2), body(1, 1), body(0, 1)]
    assert order_violations(bodies) == 1


def test_cloud_ingest_dedupes_by_id_and_keeps_its_session_while_away(tmp_path: Path) -> None:
    """The reference consumer stores each id once, counts the duplicate it dropped, and gets
    records published while it was disconnected (its persistent session queued them)."""
    broker = Mosquitto("cloud", tmp_path).start()
    try:
        db = tmp_path / "cloud.db"
        consumer = CloudIngest(db, port=broker.port).start()
        one = json.dumps({"id": "a"}).encode()
        publish_readings(broker.port, [("edge/gw/results/t", one), ("edge/gw/results/t", one)])
        wait_until(lambda: report(db)["received"] == 2, 10, "2 messages")
        consumer.stop()
        publish_readings(broker.port, [("edge/gw/deadletter", json.dumps({"id": "b"}).encode())])
        consumer = CloudIngest(db, port=broker.port).start()
        wait_until(lambda: report(db)["received"] == 3, 10, "the queued message")
        consumer.stop()
        assert report(db) == {"received": 3, "distinct": 2, "duplicates": 1, "not_json": 0,
                              "kind_deadletter": 1, "kind_results": 1}
    finally:
        broker.kill()
