"""Retained sensor readings and agent restarts, on a real mosquitto, store and model.

Zigbee2MQTT, Tasmota and ESPHome publish readings retained, and the local broker sends a topic's
retained message again on every subscribe, so on every reconnect. By default a route answers a
retained reading once: after restarts it is acked without inference. A route with
`retained = "infer"` answers it on every restart, each result with the same id.
"""

from __future__ import annotations

import json

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.store.views import read_counts
from tests.conftest import Rig
from tests.harness import TEST_ROUTES, AgentProcess, CloudCollector, wait_until

# Published before the agent's first subscribe: it arrives with the retain flag every time.
BEFORE = ("sensors/zigbee-1/temperature", json.dumps({"seq": 1, "celsius": 21.5}).encode())
# Published while the agent is subscribed: the first delivery is live (retain flag clear).
LIVE = ("sensors/tasmota-1/temperature", json.dumps({"seq": 7, "celsius": 48.0}).encode())


def publish_retained(port: int, topic: str, payload: bytes) -> None:
    """Publish one retained QoS 1 message and wait for its PUBACK."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="retained-sensor")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout=30)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def _skipped(agent: AgentProcess) -> int:
    return sum(e["skipped"] for e in agent.events() if e.get("event") ==
               "retained_readings_skipped")


def _restart(rig: Rig, agent: AgentProcess) -> AgentProcess:
    assert agent.terminate() == 0
    return rig.agent(agent.config)


def test_a_retained_reading_is_answered_once_across_restarts(rig: Rig) -> None:
    """Two retained readings, one published before the agent first subscribed and one while it
    was subscribed, give exactly one result each over two restarts of the agent."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    publish_retained(rig.local.port, *BEFORE)
    agent = rig.agent()
    agent.wait_for_event("agent_ready")
    publish_retained(rig.local.port, *LIVE)
    wait_until(lambda: len(collector.results()) == 2, 60, "one result per retained reading")
    for restart in (1, 2):
        agent = _restart(rig, agent)
        # Both come again on the new subscribe; each is acked without inference.
        wait_until(lambda a=agent: _skipped(a) == 2, 60,
                   f"2 retained readings skipped (restart {restart})")
    assert agent.terminate() == 0
    counts = read_counts(rig.store)
    assert (counts["inbox"], counts["outbox"]) == (0, 0), counts  # nothing else was taken
    results = collector.results()
    assert len(results) == 2, [r["source"]["topic"] for r in results]
    assert {r["source"]["topic"] for r in results} == {BEFORE[0], LIVE[0]}
    collector.stop()


def test_a_route_that_infers_retained_readings_answers_them_on_every_restart(rig: Rig) -> None:
    """With retained = "infer", one retained reading gives a result on the first start and one
    more after each restart, all with the same id."""
    routes = TEST_ROUTES.replace("max_tokens = 24", 'max_tokens = 24\nretained = "infer"')
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    publish_retained(rig.local.port, *BEFORE)
    agent = rig.agent(rig.config(routes=routes))
    wait_until(lambda: len(collector.results()) == 1, 60, "the first result")
    for restart in (1, 2):
        agent = _restart(rig, agent)
        wait_until(lambda n=restart: len(collector.results()) == 1 + n, 60,
                   f"a result after restart {restart}")
    assert _skipped(agent) == 0
    assert len(collector.distinct_ids()) == 1  # the receiver drops the repeats by id
    collector.stop()
