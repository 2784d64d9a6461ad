"""The watchdog's judgement, pure logic on an injected clock: a loop idle for a known reason is
never stalled; a busy one is stalled only past the bound; progress restarts the count."""

from __future__ import annotations

import asyncio
import time

from agent.base.liveness import Liveness
from agent.config.settings import ServiceEnvironment, ServiceSection
from agent.service.sdnotify import Notifier
from agent.service.systemd import Service
from tests.harness import wait_until
from tests.test_service import NotifyListener


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


def test_a_blocked_event_loop_sends_no_watchdog_pings() -> None:
    """The pings come from the event loop itself, not a thread: while the loop is blocked (a
    synchronous call that never returns, as in issue 12's silent agent) systemd hears nothing,
    so its watchdog restarts the agent; the pings resume when the loop runs again."""
    listener = NotifyListener()
    env = ServiceEnvironment(notify_socket=listener.path, watchdog_usec=200_000,
                             watchdog_pid=None)
    notifier = Notifier(listener.path)
    service = Service(ServiceSection(), env, notifier)
    service.watch([Liveness("pipeline")])

    def pings_after(moment: float, count: int) -> bool:
        return len([t for t in listener.times("WATCHDOG=1") if t > moment]) >= count

    async def scenario() -> tuple[float, float]:
        watchdog = asyncio.create_task(service.run_watchdog(), name="watchdog")
        try:
            await asyncio.to_thread(wait_until, lambda: pings_after(0, 3), 30, "3 pings")
            blocked = time.monotonic()
            time.sleep(1.5)  # noqa: ASYNC251 - the point: the loop is blocked
            unblocked = time.monotonic()
            await asyncio.to_thread(wait_until, lambda: pings_after(unblocked, 3), 30,
                                    "3 pings after the loop runs again")
            return blocked, unblocked
        finally:
            watchdog.cancel()

    try:
        blocked, unblocked = asyncio.run(scenario())
    finally:
        notifier.close()
        listener.close()
    # A datagram sent just before the block may be received a moment into it.
    during = [t for t in listener.times("WATCHDOG=1") if blocked + 0.1 < t < unblocked]
    assert during == []
