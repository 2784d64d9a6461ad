"""A local broker that lost the agent's persistent session is reported, on the real parts.

A mosquitto restarted without its persistence file has forgotten the agent's session, and with
it every reading published while the agent was away: the agent says so (`local_session_lost`),
counts it in `edge_agent_session_lost_total` and in the retained status topic, whether the
broker restarted while the agent ran or while it was stopped too (a gateway's reboot). A broker
restarted with its persistence keeps the session, and then nothing is reported.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.service.metrics import scrape
from tests.conftest import Rig
from tests.harness import AgentProcess, CloudCollector, publish_readings, wait_until


def _subscribed(agent: AgentProcess) -> list[dict[str, Any]]:
    return [e for e in agent.events() if e.get("event") == "ingest_subscribed"]


def _sessions_lost_metric(agent: AgentProcess) -> float:
    port = agent.wait_for_event("metrics_serving")["port"]
    series = scrape(f"http://127.0.0.1:{port}/metrics")
    return sum(value for _, value in series.get("edge_agent_session_lost_total", []))


@pytest.mark.parametrize("when", ["agent_running", "agent_stopped"])
@pytest.mark.parametrize("persistence", [False, True], ids=["lost", "kept"])
def test_a_local_broker_restart_that_loses_the_session_is_logged_counted_and_reported(
    rig: Rig, persistence: bool, when: str
) -> None:
    """After the local broker restarts without its persistence, while the agent runs or while
    it is stopped too, the agent logs local_session_lost, counts it in /metrics and on the
    status topic; with persistence, the session is found again and none of that happens."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    agent = rig.agent(rig.config(service="metrics_port = 0\nstatus_interval_s = 1"))
    agent.wait_for_event("agent_ready")
    assert _subscribed(agent)[0]["session_present"] is False  # a new session
    if when == "agent_stopped":
        publish_readings(rig.local.port, [("sensors/s1/temperature", b'{"seq": 1}')])
        wait_until(lambda: len(collector.results()) == 1, 60, "a result before the stop")
        assert agent.terminate() == 0

    rig.local.stop()  # SIGTERM: mosquitto writes the agent's session to its persistence file
    database = rig.local.dir / "mosquitto.db"
    assert database.exists()
    if not persistence:
        database.unlink()  # the broker comes back as one without persistence would
    rig.local.start()
    if when == "agent_stopped":
        agent = rig.agent(agent.config)
        agent.wait_for_event("agent_ready")
        reconnect = _subscribed(agent)[0]
    else:
        wait_until(lambda: len(_subscribed(agent)) >= 2, 60, "ingest to subscribe again")
        reconnect = _subscribed(agent)[1]
    assert reconnect["session_present"] is persistence
    # Status bodies sent before the reconnect say 0 whatever happens next: only later ones count.
    seen = len(collector.results("status"))

    expected = 0 if persistence else 1

    def status_says(count: int) -> bool:
        bodies = [b for b in collector.results("status")[seen:] if "local_sessions_lost" in b]
        return bool(bodies) and bodies[-1]["local_sessions_lost"] == count

    # The status refreshes every second; its latest body carries the count.
    wait_until(lambda: status_says(expected), 30, f"status with local_sessions_lost={expected}")
    lost = [e for e in agent.events() if e.get("event") == "local_session_lost"]
    assert len(lost) == expected, lost
    if lost:
        assert "readings published while the agent was disconnected" in lost[0]["meaning"]
        assert lost[0]["level"] == "warning"
        assert lost[0]["at_start"] is (when == "agent_stopped")
    # The sampler is not involved: the counter moves when ingest reports it.
    assert _sessions_lost_metric(agent) == expected
    collector.stop()
