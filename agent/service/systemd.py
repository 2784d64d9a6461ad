"""What the agent tells its supervisor: systemd's READY/STATUS/WATCHDOG/STOPPING, judged here.

Owns the watchdog decision. WATCHDOG=1 goes out at half of $WATCHDOG_USEC only while every
critical loop (ingest, pipeline, uplink, inference worker) is idle for a known reason or has been
busy for less than `service.stall_timeout_s`, so a stalled agent stops pinging and systemd restarts
it. The pings come from the event loop itself: a blocked loop stops them too. It sends through
agent/service/sdnotify.py and reads the loops' `Liveness`; it never touches a loop's work.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import Protocol

import structlog

from agent.base.records import QueueStats
from agent.config.settings import ServiceEnvironment, ServiceSection
from agent.service.sdnotify import Notifier

log = structlog.get_logger()

# Without a systemd watchdog the loops are still judged (and stalls logged) at this pace.
CHECK_INTERVAL_S = 5.0


class LoopLiveness(Protocol):
    """A critical loop as the watchdog judges it (agent/liveness.Liveness, or a stand-in that
    follows whichever inference worker serves traffic now)."""

    name: str

    def stalled_for(self, stall_after_s: float) -> float | None: ...


class Service:
    def __init__(
        self,
        section: ServiceSection,
        env: ServiceEnvironment,
        notifier: Notifier,
    ) -> None:
        self._section = section
        self._notifier = notifier
        self._loops: list[LoopLiveness] = []
        self._status = ""
        self.stalled: list[str] = []
        self.pings = 0
        # sd_watchdog_enabled(3): the watchdog is ours only if WATCHDOG_PID is unset or our pid.
        ours = env.watchdog_pid is None or env.watchdog_pid == os.getpid()
        self.watchdog_interval_s = (
            env.watchdog_usec / 2 / 1_000_000 if env.watchdog_usec and ours else None
        )

    def watch(self, loops: Sequence[LoopLiveness]) -> None:
        """The critical loops whose liveness gates the watchdog."""
        self._loops = list(loops)

    def ready(self, status: str) -> None:
        self._status = status
        self._notifier.notify(READY=1, STATUS=status)

    def reloading(self) -> None:
        """RELOADING=1 with MONOTONIC_USEC, as systemd (v253+) wants it for Type=notify-reload."""
        self._notifier.notify(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000,
                              STATUS="reloading configuration")

    def reloaded(self) -> None:
        self._notifier.notify(READY=1, STATUS=self._status or "ready")

    def stopping(self) -> None:
        self._notifier.notify(STOPPING=1, STATUS="stopping: draining")

    def status(self, text: str) -> None:
        """STATUS= sent only when it changed."""
        if text != self._status:
            self._status = text
            self._notifier.notify(STATUS=text)

    def check(self) -> list[tuple[str, float]]:
        """The stalled loops with how long each has been busy."""
        stalled = []
        for loop in self._loops:
            busy_s = loop.stalled_for(self._section.stall_timeout_s)
            if busy_s is not None:
                stalled.append((loop.name, busy_s))
        return stalled

    async def run_watchdog(self) -> None:
        """Judge the loops every tick; ping systemd only when none is stalled. Runs until
        cancelled."""
        interval = self.watchdog_interval_s or CHECK_INTERVAL_S
        log.info("watchdog_started", enabled=self.watchdog_interval_s is not None,
                 interval_s=round(interval, 3), stall_timeout_s=self._section.stall_timeout_s)
        while True:
            stalled = self.check()
            names = [name for name, _ in stalled]
            if names and names != self.stalled:
                log.error("watchdog_withheld", stalled=names,
                          busy_s={name: round(busy, 1) for name, busy in stalled})
            elif not names and self.stalled:
                log.info("watchdog_resumed", was_stalled=self.stalled)
            self.stalled = names
            pinging = not names and self.watchdog_interval_s is not None
            if pinging and self._notifier.notify(WATCHDOG=1):
                self.pings += 1
            await asyncio.sleep(interval)


def summary_line(
    model: str, stats: QueueStats | None, *, local_up: bool, cloud_up: bool,
    stalled: Sequence[str] = (),
) -> str:
    """The one-line STATUS= text: model, queue depths, link state, stalls."""
    parts = [f"model {model}"]
    if stats is not None:
        parts.append(f"inbox {stats.inbox}, outbox {stats.outbox}, dead letters "
                     f"{stats.dead_letter}, delivered {stats.delivered}")
    parts.append(f"local {'up' if local_up else 'down'}, cloud {'up' if cloud_up else 'down'}")
    if stalled:
        parts.append(f"STALLED: {', '.join(stalled)}")
    return "; ".join(parts)
