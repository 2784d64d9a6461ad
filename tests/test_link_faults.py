"""Network faults between the agent and the cloud broker, made real by tests/fault_proxy.py:
an outage, a flapping link, a half-open connection and lost PUBACKs. Real mosquitto, the real
agent process, real llama.cpp."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.config.settings import Settings
from agent.flows.uplink import Uplink
from agent.routing.outbound import Topics, model_event_row
from agent.store.views import read_counts
from agent.store.writer import Store
from tests.conftest import Rig
from tests.fault_proxy import FaultProxy
from tests.harness import (
    AgentProcess,
    CloudCollector,
    publish_readings,
    wait_until,
    write_agent_config,
)

KEEPALIVE_S = 5


def readings(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [(f"sensors/s{i % 3}/temperature", json.dumps({"seq": i, "celsius": 20}).encode())
            for i in range(start, start + n)]


@pytest.fixture
def proxied(rig: Rig) -> Iterator[tuple[Rig, FaultProxy, CloudCollector]]:
    """Both brokers up, a collector subscribed, and a proxy in front of the cloud broker."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    proxy = FaultProxy(rig.cloud.port).start()
    try:
        yield rig, proxy, collector
    finally:
        collector.stop()
        proxy.stop()


def start_agent(rig: Rig, proxy: FaultProxy, extra: str = "") -> AgentProcess:
    config = write_agent_config(
        rig.workdir / "agent.toml", state_dir=rig.workdir / "state", model_path=rig.model,
        local_port=rig.local.port, cloud_port=proxy.port, extra=extra,
    )
    agent = rig.agent(config)
    agent.wait_for_event("agent_ready")
    return agent


def events(agent: AgentProcess, name: str) -> list[dict[str, object]]:
    return [e for e in agent.events() if e.get("event") == name]


def stamp(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def test_outage_buffers_and_everything_is_delivered_when_the_link_returns(
    proxied: tuple[Rig, FaultProxy, CloudCollector],
) -> None:
    """With the proxy refusing connections, 30 readings wait in the outbox and the uplink keeps
    retrying; when the proxy passes again all 30 arrive and the outbox empties."""
    rig, proxy, collector = proxied
    proxy.set_mode("refuse")
    agent = start_agent(rig, proxy)
    publish_readings(rig.local.port, readings(30))
    wait_until(lambda: read_counts(rig.store)["outbox"] == 30, 90, "30 rows waiting")
    agent.wait_for_event("uplink_link_failed")
    assert collector.results() == []
    proxy.set_mode("pass")
    wait_until(lambda: len(collector.distinct_ids()) == 30, 60, "30 results delivered")
    wait_until(lambda: read_counts(rig.store)["outbox"] == 0, 30, "outbox drained")


def test_flapping_link_delivers_everything_without_a_reconnect_storm(
    proxied: tuple[Rig, FaultProxy, CloudCollector],
) -> None:
    """The proxy resets every connection every 0.7 s for 8 s while 60 readings flow: all 60
    arrive, and the agent connects far fewer times than a tight retry loop would."""
    rig, proxy, collector = proxied
    agent = start_agent(rig, proxy)
    publish_readings(rig.local.port, readings(60))
    flapping_until = time.monotonic() + 8
    resets = 0
    rss_kib: list[int] = []
    while time.monotonic() < flapping_until:
        time.sleep(0.7)
        proxy.reset()
        resets += 1
        rss_kib.append(_rss_kib(agent))
    wait_until(lambda: len(collector.distinct_ids()) == 60, 90, "60 results delivered")
    connects = len(events(agent, "uplink_connected"))
    growth_mib = (rss_kib[-1] - rss_kib[1]) / 1024
    print(f"flapping: resets={resets} connects={connects} proxy_accepts={proxy.accepted} "
          f"rss_mib={rss_kib[1] / 1024:.1f}->{rss_kib[-1] / 1024:.1f}")
    # Memory stays flat: a leak per connection (clients, tasks, buffers) would show here.
    assert growth_mib < 8, f"agent RSS grew {growth_mib:.1f} MiB over {resets} resets"
    # Backoff (0.1 s doubling to 1 s, jittered) allows a few connects per reset, not hundreds.
    assert connects <= 4 * resets + 2


def test_half_open_connection_is_detected_within_one_and_a_half_keepalives(
    proxied: tuple[Rig, FaultProxy, CloudCollector],
) -> None:
    """When the proxy silently stops forwarding (no FIN, no RST), the idle uplink notices within
    1.5 x keepalive (plus the client's 1 s housekeeping tick), reconnects once the path works,
    and delivers readings published meanwhile."""
    rig, proxy, collector = proxied
    agent = start_agent(rig, proxy)
    publish_readings(rig.local.port, readings(3))
    wait_until(lambda: len(collector.distinct_ids()) == 3, 60, "3 results")
    time.sleep(1.0)
    proxy.set_mode("blackhole")
    silenced = time.time()
    failed = agent.wait_for_event("uplink_link_failed", 4 * KEEPALIVE_S)
    detected_s = stamp(failed) - silenced
    print(f"half-open detected after {detected_s:.2f} s (keepalive {KEEPALIVE_S} s)")
    assert detected_s <= 1.5 * KEEPALIVE_S + 1.0
    publish_readings(rig.local.port, readings(3, 3))
    proxy.set_mode("pass")
    proxy.reset()  # the blackholed connections are gone for good
    wait_until(lambda: len(collector.distinct_ids()) == 6, 60, "6 results")


def test_lost_pubacks_leave_rows_undelivered_and_they_are_resent_with_the_same_ids(
    proxied: tuple[Rig, FaultProxy, CloudCollector],
) -> None:
    """The proxy passes CONNACK (4 bytes) and drops every later server-to-client byte: the
    broker gets the results but the agent never sees a PUBACK, so the rows stay in the outbox.
    Once PUBACKs flow again the same ids are sent again; the store counts each row delivered
    once and the receiver sees duplicates it can drop by id."""
    rig, proxy, collector = proxied
    agent = start_agent(rig, proxy)
    proxy.set_mode("drop_s2c", s2c_bytes=4)
    proxy.reset()
    agent.wait_for_event("uplink_connected")
    publish_readings(rig.local.port, readings(5))
    wait_until(lambda: len(collector.distinct_ids()) == 5, 60, "5 results at the broker")
    assert read_counts(rig.store)["outbox"] == 5, "a row was retired without its PUBACK"
    agent.wait_for_event("uplink_link_failed", 30)
    assert read_counts(rig.store)["outbox"] == 5
    proxy.set_mode("pass")
    wait_until(lambda: read_counts(rig.store)["outbox"] == 0, 60, "outbox drained")
    seen = Counter(body["id"] for body in collector.results())
    assert len(seen) == 5
    assert all(count >= 2 for count in seen.values()), f"not all ids resent: {seen}"
    assert read_counts(rig.store)["delivered"] == 5


def _rss_kib(agent: AgentProcess) -> int:
    assert agent.proc is not None
    for line in Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def test_a_row_without_its_puback_ends_the_connection_at_publish_timeout(
    rig: Rig, tmp_path: Path
) -> None:
    """The uplink alone (no status messages, keepalive 60 s, so neither the status publish nor
    the half-open watch can notice): PUBACKs are dropped, the rows' own deadline of
    publish_timeout_s (1 s) ends the connection, nothing is retired; once PUBACKs flow again
    every row is delivered."""
    rig.cloud.start()
    proxy = FaultProxy(rig.cloud.port).start()
    proxy.set_mode("drop_s2c", s2c_bytes=4)
    settings = Settings(
        agent={"device_id": "gw", "state_dir": tmp_path / "state"},
        model={"path": rig.model},
        cloud_broker={"port": proxy.port, "keepalive_s": 60, "publish_timeout_s": 1.0},
        routes=[{"name": "temperature", "topics": ["sensors/+/temperature"],
                 "instruction": "Classify."}],
    )
    store = await Store.open(settings.store_path)
    topics = Topics("edge", "gw")
    stop = asyncio.Event()
    try:
        for i in range(5):
            await store.enqueue(model_event_row(topics, f"row-{i}", "test", {"i": i}))
        uplink = Uplink(settings, store, topics, status=None)
        with capture_logs() as logs:
            started = time.monotonic()
            task = asyncio.create_task(uplink.run(stop), name="uplink-under-test")
            while not any(e["event"] == "uplink_link_failed" for e in logs):
                assert time.monotonic() - started < 10, "no PUBACK deadline within 10 s"
                await asyncio.sleep(0.05)
            failed_after_s = time.monotonic() - started
            failure = next(e for e in logs if e["event"] == "uplink_link_failed")
        assert "no PUBACK within 1.0 s (5 rows in flight)" in failure["error"]
        assert (await store.depths())["outbox"] == 5
        proxy.set_mode("pass")
        deadline = time.monotonic() + 30
        while (await store.depths())["outbox"]:
            assert time.monotonic() < deadline, "rows not delivered after PUBACKs returned"
            await asyncio.sleep(0.05)
        assert uplink.delivered == 5
        print(f"PUBACK deadline 1.0 s: connection ended after {failed_after_s:.2f} s")
        assert failed_after_s < 4
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        stop.set()
        proxy.stop()
        await store.close()
