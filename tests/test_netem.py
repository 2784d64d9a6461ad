"""Real network faults between the agent and the cloud broker (issue 14): the cloud mosquitto
runs in a network namespace made by the test, behind a point-to-point link on a private /30
whose packets are lost, delayed or black-holed (tests/netns.py: tc netem where the kernel has
it, else a TUN wire doing the same). The kernel's own TCP sees the faults, unlike the TCP proxy
of tests/test_link_faults.py, which stays the tool for resets, refusals and lost PUBACKs.
Real agent process, real llama.cpp, the collector inside the namespace on its loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from agent.store.views import read_counts
from tests.conftest import Rig
from tests.harness import (
    AgentProcess,
    CloudCollector,
    publish_readings,
    wait_until,
    write_agent_config,
)
from tests.netns import CloudNamespace, in_namespace, unavailable_reason

KEEPALIVE_S = 5  # the smallest keepalive the config accepts (agent/config/sections.py)


def readings(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [(f"sensors/s{i % 3}/temperature", json.dumps({"seq": i, "celsius": 20}).encode())
            for i in range(start, start + n)]


@pytest.fixture
def cloud_ns(rig: Rig) -> Iterator[tuple[Rig, CloudNamespace, CloudCollector]]:
    """The local broker on the host, the cloud broker in its own namespace, a collector beside
    it on the namespace's loopback (so the impaired link carries only the agent's traffic)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no network namespaces here: {reason}")
    namespace = CloudNamespace()
    collector: CloudCollector | None = None
    try:
        namespace.open()
        print(f"link: {namespace.backend}, {namespace.host_addr} <-> {namespace.ns_addr} "
              f"in {namespace.name}")
        rig.local.start()
        broker = namespace.mosquitto("cloud", rig.workdir).start()
        collector = CloudCollector(broker.port)
        in_namespace(namespace.name, collector.start)
        yield rig, namespace, collector
    finally:
        if collector is not None:
            collector.stop()
        rig.close()  # the agent first, while the namespace still exists
        namespace.close()


def start_agent(rig: Rig, namespace: CloudNamespace) -> AgentProcess:
    broker = namespace.brokers[0]
    config = write_agent_config(
        rig.workdir / "agent.toml", state_dir=rig.workdir / "state", model_path=rig.model,
        local_port=rig.local.port, cloud_port=broker.port,
        # No status refresh on the link during a test: only keepalive may notice silence.
        service="metrics_port = 0\nstatus_interval_s = 3600",
    )
    text = config.read_text()
    assert f"keepalive_s = {KEEPALIVE_S}" in text
    config.write_text(text.replace("[cloud_broker]\n",
                                   f'[cloud_broker]\nhost = "{namespace.ns_addr}"\n'))
    agent = rig.agent(config)
    agent.wait_for_event("agent_ready")
    return agent


def events(agent: AgentProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in agent.events() if e.get("event") == name]


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def test_every_reading_arrives_through_a_link_losing_a_fifth_of_its_packets(
    cloud_ns: tuple[Rig, CloudNamespace, CloudCollector],
) -> None:
    """With 20 % packet loss and 300 ms delay each way on the only link to the cloud broker,
    all 40 readings published arrive at the cloud, none is dead-lettered and the outbox drains."""
    rig, namespace, collector = cloud_ns
    namespace.impair(loss_pct=20, delay_ms=300)
    handshake_s = namespace.connect_s(namespace.brokers[0].port, timeout_s=30)
    assert handshake_s >= 0.6, f"a handshake took {handshake_s:.2f} s: the link is not delayed"
    started = time.monotonic()
    agent = start_agent(rig, namespace)
    agent.wait_for_event("uplink_connected", 60)
    publish_readings(rig.local.port, readings(40))
    wait_until(lambda: len(collector.distinct_ids()) == 40, 75, "40 results through the loss")
    wait_until(lambda: read_counts(rig.store)["outbox"] == 0, 30, "outbox drained")
    counts = read_counts(rig.store)
    print(f"loss 20% delay 300ms ({namespace.backend}): 40/40 results in "
          f"{time.monotonic() - started:.1f} s, {len(collector.results())} messages with "
          f"duplicates, connects={len(events(agent, 'uplink_connected'))} "
          f"link_failed={len(events(agent, 'uplink_link_failed'))} "
          f"packets_dropped={namespace.dropped} handshake={handshake_s:.2f}s")
    assert namespace.dropped > 0, "no packet was lost: the link was not impaired"
    assert counts["dead_letter"] == 0
    assert counts["inbox"] == 0


def test_a_black_holed_link_is_detected_within_the_keepalive_bound_and_nothing_is_lost(
    cloud_ns: tuple[Rig, CloudNamespace, CloudCollector],
) -> None:
    """When every packet on the link is silently dropped for 30 s (no RST, no ICMP), the idle
    uplink reports the link failed within 1.5 x keepalive + 1 s, keeps the readings published
    meanwhile in its outbox, and delivers all of them once the link carries packets again."""
    rig, namespace, collector = cloud_ns
    agent = start_agent(rig, namespace)
    publish_readings(rig.local.port, readings(3))
    wait_until(lambda: len(collector.distinct_ids()) == 3, 60, "3 results before the fault")
    time.sleep(1.0)  # the uplink idles: only keepalive can notice the silence
    namespace.blackhole()
    silenced = time.time()
    connects_before = len(events(agent, "uplink_connected"))

    def failed_after_silence() -> bool:
        return any(stamp(e) >= silenced for e in events(agent, "uplink_link_failed"))

    wait_until(failed_after_silence, 4 * KEEPALIVE_S, "uplink_link_failed after the blackhole")
    failed = next(e for e in events(agent, "uplink_link_failed") if stamp(e) >= silenced)
    detected_s = stamp(failed) - silenced
    print(f"blackhole ({namespace.backend}): half-open detected after {detected_s:.2f} s "
          f"(keepalive {KEEPALIVE_S} s, bound {1.5 * KEEPALIVE_S + 1:.1f} s): "
          f"{failed.get('error')}")
    assert detected_s <= 1.5 * KEEPALIVE_S + 1.0
    with pytest.raises(TimeoutError):  # silence, not a refusal: the agent cannot tell early
        namespace.connect_s(namespace.brokers[0].port, timeout_s=1.0)
    publish_readings(rig.local.port, readings(20, 3))
    wait_until(lambda: read_counts(rig.store)["outbox"] >= 20, 60, "20 results held offline")
    assert len(collector.distinct_ids()) == 3, "a result crossed a black-holed link"
    time.sleep(max(0.0, silenced + 30 - time.time()))  # the 30 s outage
    namespace.heal()
    healed = time.monotonic()
    wait_until(lambda: len(collector.distinct_ids()) == 23, 60, "23 results after the link")
    wait_until(lambda: read_counts(rig.store)["outbox"] == 0, 30, "outbox drained")
    print(f"link back: 23/23 results {time.monotonic() - healed:.1f} s after healing, "
          f"reconnects={len(events(agent, 'uplink_connected')) - connects_before}, "
          f"packets_dropped={namespace.dropped}")
    assert read_counts(rig.store)["dead_letter"] == 0
