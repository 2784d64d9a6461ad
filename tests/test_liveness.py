"""The watchdog's judgement, pure logic on an injected clock: a loop idle for a known reason is
never stalled; a busy one is stalled only past the bound; progress restarts the count."""

from __future__ import annotations

from agent.config import ServiceEnvironment, ServiceSection
from agent.liveness import Liveness
from agent.sdnotify import Notifier
from agent.service import Service


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_idle_is_never_stalled_and_busy_is_stalled_only_past_the_bound() -> None:
    clock = Clock()
    loop = Liveness("pipeline", clock)
    loop.idle("waiting for input")
    clock.now += 1000
    assert loop.stalled_for(5) is None
    loop.busy()
    clock.now += 4
    assert loop.stalled_for(5) is None
    clock.now += 2
    assert loop.stalled_for(5) == 6
    loop.progressed()
    assert loop.stalled_for(5) is None


def test_service_names_only_the_stalled_loops_and_honours_watchdog_pid() -> None:
    clock = Clock()
    loops = [Liveness(name, clock) for name in ("ingest", "pipeline", "uplink")]
    env = ServiceEnvironment(notify_socket=None, watchdog_usec=2_000_000, watchdog_pid=None)
    service = Service(ServiceSection(stall_timeout_s=3), env, Notifier(None))
    service.watch(loops)
    assert service.watchdog_interval_s == 1.0
    loops[1].busy()
    clock.now += 10
    assert [name for name, _ in service.check()] == ["pipeline"]
    other = ServiceEnvironment(notify_socket=None, watchdog_usec=2_000_000, watchdog_pid=1)
    assert Service(ServiceSection(), other, Notifier(None)).watchdog_interval_s is None
