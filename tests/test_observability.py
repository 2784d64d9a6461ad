"""What an operator sees of a running agent, on real parts: /metrics, /healthz and /readyz on
loopback, the retained MQTT status with its birth and last-will messages, and the read-only
`edge-agent status` and `edge-agent queue` commands."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.service.metrics import Endpoint, Metrics, scrape
from agent.store.views import read_drops
from tests.conftest import Rig
from tests.harness import TEST_ROUTES, CloudCollector, publish_readings, wait_until


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def retained_status(port: int, topic: str) -> dict[str, Any]:
    """What a fresh subscriber gets on the status topic: the retained message."""
    got: list[dict[str, Any]] = []
    done = threading.Event()

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if message.retain:
            got.append(json.loads(message.payload))
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="status-reader")
    client.on_message = on_message
    client.on_connect = lambda c, *args: c.subscribe(topic, qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert done.wait(10), f"no retained message on {topic}"
        return got[0]
    finally:
        client.disconnect()
        client.loop_stop()


def test_metrics_health_status_topic_and_operator_commands(rig: Rig) -> None:
    """Three readings become results: /metrics counts them by route, executor and outcome with
    their latencies, links are up, the model's sha256 is exported; /healthz and /readyz answer;
    the retained status is `online` with the summary and turns `offline` (the last will) when
    the agent is SIGKILLed; `status` and `queue` print the running agent's state."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    config = rig.config(service="metrics_port = 0\nstatus_interval_s = 1")
    agent = rig.agent(config)
    agent.wait_for_event("agent_ready")
    port = agent.wait_for_event("metrics_serving")["port"]
    base = f"http://127.0.0.1:{port}"
    publish_readings(rig.local.port, [
        (f"sensors/s{i}/temperature", json.dumps({"seq": i}).encode()) for i in range(3)])
    publish_readings(rig.local.port, [("sensors/bad/temperature", b"not json")])
    wait_until(lambda: len(collector.results()) == 3, 60, "3 results")

    assert get(f"{base}/healthz") == (200, "alive\n")
    assert get(f"{base}/readyz") == (200, "ready\n")
    assert get(f"{base}/nope")[0] == 404

    def sampled() -> bool:
        series = scrape(f"{base}/metrics")
        return series.get("edge_agent_dead_letters", [({}, 0)])[0][1] == 1
    wait_until(sampled, 10, "the sampler's next snapshot")
    series = scrape(f"{base}/metrics")
    results = {(s["route"], s["executor"], s["outcome"]): v
               for s, v in series["edge_agent_results_total"]}
    assert results == {("temperature", "local", "ok"): 3.0}
    assert dict(series["edge_agent_inference_latency_seconds_count"][0][0]) == {
        "route": "temperature"}
    assert series["edge_agent_inference_latency_seconds_count"][0][1] == 3
    assert series["edge_agent_inference_tokens_per_second_count"][0][1] == 3
    links = {s["broker"]: v for s, v in series["edge_agent_link_up"]}
    assert links == {"local": 1.0, "cloud": 1.0}
    sha = agent.wait_for_event("model_answered")["sha256"]
    assert series["edge_agent_model_info"][0][0]["sha256"] == sha
    assert series["edge_agent_worker_restarts_total"][0][1] == 0
    assert series["edge_agent_ready"][0][1] == 1
    rows = {s["queue"]: v for s, v in series["edge_agent_queue_rows"]}
    assert rows == {"inbox": 0.0, "outbox": 0.0}

    # The status is refreshed every second, independently of the sampler: wait for a refresh
    # that has seen the dead letter.
    wait_until(lambda: (retained_status(rig.cloud.port, "edge/gw-test/status").get("queues")
                        or {}).get("dead_letter") == 1, 15, "a status refresh after the letter")
    status = retained_status(rig.cloud.port, "edge/gw-test/status")
    assert status["state"] == "online"
    assert status["model"]["sha256"] == sha
    assert status["queues"]["dead_letter"] == 1

    cli = [sys.executable, "-m", "agent"]
    shown = subprocess.run([*cli, "status", "--config", str(config), "--url",
                            f"{base}/metrics"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "ready" in shown.stdout
    assert "temperature/local/ok 3" in shown.stdout
    assert "dead letters 1" in shown.stdout
    queue = subprocess.run([*cli, "queue", "--config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert queue.returncode == 0, queue.stdout + queue.stderr
    assert "sensors/bad/temperature" in queue.stdout
    assert "reason: malformed JSON" in queue.stdout

    agent.kill()
    wait_until(lambda: retained_status(rig.cloud.port, "edge/gw-test/status")["state"]
               == "offline", 20, "the last will")
    down = subprocess.run([*cli, "status", "--config", str(config), "--url", f"{base}/metrics"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 3
    assert "not answering" in down.stdout
    assert "dead letters 1" in down.stdout  # the store is still readable
    collector.stop()


def test_readyz_reports_the_reason_it_is_not_ready() -> None:
    """/readyz is 503 with the reason while /healthz stays 200: alive is not ready."""

    async def scenario() -> tuple[tuple[int, str], tuple[int, str]]:
        endpoint = Endpoint(Metrics(), lambda: "model not answering")
        server = asyncio.create_task(endpoint.serve("127.0.0.1", 0))
        await asyncio.wait_for(endpoint.listening.wait(), 10)
        base = f"http://127.0.0.1:{endpoint.port}"
        try:
            return (await asyncio.to_thread(get, f"{base}/readyz"),
                    await asyncio.to_thread(get, f"{base}/healthz"))
        finally:
            server.cancel()

    ready, alive = asyncio.run(scenario())
    assert ready == (503, "not ready: model not answering\n")
    assert alive == (200, "alive\n")


def test_dropped_records_are_counted_by_reason_in_the_metrics(rig: Rig) -> None:
    """With the cloud down, a result of a route with a 1 s TTL expires, and 5 results for an
    outbox bound of 3 rows push out the 2 oldest: /metrics counts 1 `ttl` and 2 `outbox_full`
    drops, the same as the store's drops table."""
    rig.local.start()
    rig.cloud.start()
    rig.cloud.stop()
    routes = TEST_ROUTES + """
[[routes]]
name = "pressure"
topics = ["sensors/+/pressure"]
instruction = "Classify."
max_tokens = 8
ttl_s = 1.0
"""
    agent = rig.agent(rig.config(extra="[store]\nmax_outbox_rows = 3\n", routes=routes))
    port = agent.wait_for_event("metrics_serving")["port"]
    agent.wait_for_event("agent_ready")

    def dropped() -> dict[str, float]:
        series = scrape(f"http://127.0.0.1:{port}/metrics")
        return {labels["reason"]: value
                for labels, value in series["edge_agent_dropped_records_total"]}

    assert dropped() == {"outbox_full": 0.0, "ttl": 0.0}
    publish_readings(rig.local.port, [("sensors/p/pressure", b'{"seq": 0}')])
    wait_until(lambda: dropped()["ttl"] == 1, 60, "the expired result counted")
    publish_readings(rig.local.port, [
        (f"sensors/s{i}/temperature", json.dumps({"seq": i}).encode()) for i in range(5)])
    wait_until(lambda: dropped()["outbox_full"] == 2, 90, "2 drops at the bound counted")
    assert dropped() == {"outbox_full": 2.0, "ttl": 1.0}
    assert read_drops(rig.store) == {"pressure/ttl": 1, "temperature": 2}
