"""systemd's notify protocol on a real NOTIFY_SOCKET: READY after the probe, WATCHDOG pings that
stop while the pipeline is stalled, STOPPING on SIGTERM, and a bounded stop that keeps unsent
rows. The agent is a real process between real brokers, on real llama.cpp."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store.views import read_counts
from tests.conftest import Rig
from tests.harness import AgentProcess, CloudCollector, publish_readings, wait_until


class NotifyListener:
    """The systemd side of sd_notify: a bound AF_UNIX datagram socket recording every line."""

    def __init__(self) -> None:
        # A short path: AF_UNIX addresses are limited to 108 bytes, pytest's tmp paths are long.
        self._dir = tempfile.mkdtemp(prefix="notify-", dir="/tmp")
        self.path = os.path.join(self._dir, "notify.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.2)
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            with self._lock:
                self.lines.extend((now, line) for line in data.decode().splitlines())

    def times(self, line: str) -> list[float]:
        with self._lock:
            return [at for at, text in self.lines if text == line]

    def statuses(self) -> list[str]:
        with self._lock:
            return [text[7:] for _, text in self.lines if text.startswith("STATUS=")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        os.unlink(self.path)
        os.rmdir(self._dir)


@pytest.fixture
def notify() -> Iterator[NotifyListener]:
    listener = NotifyListener()
    try:
        yield listener
    finally:
        listener.close()


def start_agent(rig: Rig, notify: NotifyListener, *, service: str = "metrics_port = 0",
                env: dict[str, str] | None = None) -> AgentProcess:
    config = rig.config(service=service)
    agent = AgentProcess(config, rig.workdir / "agent.log", env={
        "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000", **(env or {})})
    rig.agents.append(agent)
    return agent.start()


def test_ready_is_sent_after_the_model_answered_the_probe(
    rig: Rig, notify: NotifyListener
) -> None:
    """READY=1 arrives once, after the model answered its probe (the log says so by then), with a
    STATUS= line naming the model; WATCHDOG=1 pings follow at half of WATCHDOG_USEC."""
    rig.local.start()
    started = time.monotonic()
    agent = start_agent(rig, notify)
    wait_until(lambda: bool(notify.times("READY=1")), 60, "READY=1")
    ready_at = notify.times("READY=1")[0]
    answered = [e for e in agent.events() if e.get("event") == "model_answered"]
    assert answered, "READY=1 came before the model answered the probe"
    assert notify.statuses()
    assert notify.statuses()[0].startswith("model tiny-test v1")
    wait_until(lambda: len(notify.times("WATCHDOG=1")) >= 4, 10, "four watchdog pings")
    pings = notify.times("WATCHDOG=1")
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert all(0.2 < gap < 1.0 for gap in gaps), gaps
    assert len(notify.times("READY=1")) == 1
    ready = agent.wait_for_event("service_ready")
    print(f"READY after {ready_at - started:.2f}s (agent's own startup_s={ready['startup_s']})")


def test_watchdog_pings_stop_while_the_worker_hangs_and_resume_after(
    rig: Rig, notify: NotifyListener
) -> None:
    """With the worker SIGSTOPped under a long request deadline, the pipeline's reading stalls:
    after stall_timeout_s the WATCHDOG=1 pings stop and STATUS names the stalled loop; after
    SIGCONT the reading completes and the pings resume."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    agent = start_agent(rig, notify, service="metrics_port = 0\nstall_timeout_s = 2",
                        env={"EDGE_AGENT_MODEL__REQUEST_TIMEOUT_S": "120"})
    agent.wait_for_event("agent_ready")
    worker_pid = int(agent.wait_for_event("worker_ready")["pid"])
    wait_until(lambda: len(notify.times("WATCHDOG=1")) >= 2, 10, "watchdog pings")

    os.kill(worker_pid, signal.SIGSTOP)
    try:
        publish_readings(rig.local.port, [("sensors/a/temperature", b'{"celsius": 90}')])
        withheld = agent.wait_for_event("watchdog_withheld", 30)
        assert "inference_worker" in withheld["stalled"]
        time.sleep(0.6)  # a ping already on its way may still land
        silent_from = time.monotonic()
        time.sleep(2.5)
        assert not [t for t in notify.times("WATCHDOG=1") if t > silent_from], \
            "watchdog pinged while the worker was stalled"
        wait_until(lambda: any("STALLED: inference_worker" in s for s in notify.statuses()),
                   10, "STATUS naming the stalled loop")
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    agent.wait_for_event("watchdog_resumed", 30)
    resumed_from = time.monotonic()
    wait_until(lambda: len([t for t in notify.times("WATCHDOG=1") if t > resumed_from]) >= 2,
               10, "pings after SIGCONT")
    wait_until(lambda: len(collector.results()) == 1, 30, "the stalled reading's result")
    assert collector.results()[0]["status"] == "ok"
    collector.stop()


def test_sigterm_sends_stopping_and_exits_in_time_keeping_unsent_rows(
    rig: Rig, notify: NotifyListener
) -> None:
    """With the cloud down, SIGTERM sends STOPPING=1, the agent exits 0 well within its drain
    deadline, and every undelivered result is still in the store for the next start."""
    rig.local.start()
    agent = start_agent(rig, notify)
    agent.wait_for_event("agent_ready")
    readings = [(f"sensors/s{i}/temperature", json.dumps({"seq": i}).encode()) for i in range(5)]
    publish_readings(rig.local.port, readings)
    wait_until(lambda: read_counts(rig.store)["outbox"] == 5, 60, "5 outbox rows")
    sent = time.monotonic()
    assert agent.terminate(timeout_s=30) == 0
    took = time.monotonic() - sent
    assert notify.times("STOPPING=1"), "no STOPPING=1"
    assert took < 10 + 5, f"stop took {took:.1f}s, drain_timeout_s is 10"
    assert read_counts(rig.store)["outbox"] == 5
    print(f"stopped in {took:.2f}s with 5 unsent rows kept")


def test_notify_socket_path_outside_systemd_is_ignored(tmp_path: Path) -> None:
    """Without NOTIFY_SOCKET the notifier is disabled and sending is a no-op, not an error."""
    from agent.service.sdnotify import Notifier

    notifier = Notifier(None)
    assert not notifier.enabled
    assert notifier.notify(READY=1) is False
