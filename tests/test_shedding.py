"""Load shedding per topic: the token bucket on an injected clock, and a flood through the real
agent in which the other streams keep flowing and every shed reading is accounted for."""

from __future__ import annotations

import json

from agent.base.records import reading_id
from agent.routing.shedding import TopicLimiter
from tests.conftest import Rig
from tests.harness import CloudCollector, publish_readings, wait_until


def test_a_topic_gets_its_burst_then_its_rate_and_other_topics_are_untouched() -> None:
    now = [0.0]
    limiter = TopicLimiter(rate_per_s=2, burst=3, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow("b")
    now[0] = 1.0  # two more tokens for "a"
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]


def test_the_number_of_tracked_topics_is_bounded() -> None:
    limiter = TopicLimiter(rate_per_s=1, burst=1, max_topics=3, clock=lambda: 0.0)
    for topic in "abcd":
        assert limiter.allow(topic)
    assert len(limiter._buckets) == 3
    assert limiter.allow("a"), "the oldest topic was forgotten and starts with a full bucket"


def test_a_flooding_sensor_is_shed_and_counted_while_other_streams_keep_flowing(
    rig: Rig,
) -> None:
    """400 readings at once from one topic and 10 from another, with 5 readings/s and a burst
    of 10 per topic: all 10 calm readings become results; of the flood, what exceeds the bucket
    is dead-lettered with a 'shed' reason; every flood reading is a result or a dead letter."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    config = rig.config()
    config.write_text(config.read_text().replace(
        "[local_broker]\n",
        "[local_broker]\nmax_readings_per_s_per_topic = 5\nburst_readings_per_topic = 10\n"))
    agent = rig.agent(config)
    agent.wait_for_event("agent_ready")
    flood = [("sensors/stuck/temperature", json.dumps({"seq": i}).encode()) for i in range(400)]
    calm = [(f"sensors/calm{i}/temperature", json.dumps({"seq": i}).encode()) for i in range(10)]
    publish_readings(rig.local.port, flood + calm)
    ids = {name: {reading_id("gw-test", t, p) for t, p in batch}
           for name, batch in (("flood", flood), ("calm", calm))}
    wait_until(lambda: ids["calm"] <= collector.distinct_ids(), 60, "the calm results")
    wait_until(lambda: ids["flood"] <= collector.distinct_ids()
               | collector.distinct_ids("deadletter"), 120, "every flood reading accounted")
    shed = [d for d in collector.results("deadletter") if d["id"] in ids["flood"]]
    assert shed
    assert all(d["reason"].startswith("shed: topic over 5 readings/s") for d in shed)
    flood_results = collector.distinct_ids() & ids["flood"]
    assert len(flood_results) + len(shed) == 400
    assert len(flood_results) < 50, "the bucket let far more than its burst and rate through"
    print(f"flood: {len(flood_results)} results, {len(shed)} shed; calm: 10 of 10")
    collector.stop()
