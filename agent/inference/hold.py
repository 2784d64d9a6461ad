"""Holding a candidate worker while the serving worker answers (issue 16): SIGSTOP to the
candidate's process group when a request goes to the serving worker, SIGCONT when its answer
is back, so the candidate loads and answers its canary only in the gaps between readings.

Under SCHED_IDLE alone (agent/inference/priority.py) the candidate still slowed the serving
worker: its threads, spinning at OpenMP barriers beside the serving worker's, took the bench
model's 41-47 ms answers to 91-703 ms (409 ms worst added latency during an update). A stopped
process takes no CPU at all. The signal is the serving worker's own exchange (a request line
written, its answer not yet read: `request_started`, `request_ended`), not a lease, which also
covers a reading's schema check, retries and commit.

The bound. Time held does not count against the candidate's deadlines (its load, each canary
request: `deadline`), and the canary's latency leaves it out (`held_s`). So that a backlog
cannot keep an update waiting for ever, the candidate is held for `max_held_s` in all at most
(agent/ota/updates.py gives its load timeout: an update under a full backlog then takes at most
one load deadline longer than without the hold); after that it runs beside the serving worker,
still under SCHED_IDLE, and `candidate_hold_bound_reached` is logged once.

Owns only the two signals and the time held: starting, killing and reaping the worker stay with
agent/inference/supervisor.py, which ends the hold (SIGCONT) before it waits for the process.
kill(2) of the agent's own child needs no privilege, and the unit's @system-service filter set
allows it (systemd/edge-agent.service).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from types import TracebackType
from typing import Any

import structlog

from agent.inference.supervisor import InferenceWorker

log = structlog.get_logger()


class CandidateHold:
    """Stops one candidate worker's process group while `serving` has a request in flight;
    a context manager: watching `serving` inside, the candidate continued for good on leaving."""

    def __init__(self, serving: InferenceWorker, max_held_s: float) -> None:
        self._serving = serving
        self.max_held_s = max_held_s
        self._pid: int | None = None  # the candidate's process group, while it has one
        self._serving_busy = False
        self._stopped_at: float | None = None  # time.monotonic() of the current hold
        self._held_before_s = 0.0  # the holds that ended
        self.times = 0
        self.bound_reached = False
        self._ended = False
        self._bound: asyncio.TimerHandle | None = None
        # The candidate's deadlines in force, and while it is held the time each had left.
        self._deadlines: dict[asyncio.Timeout, float | None] = {}

    def __enter__(self) -> CandidateHold:
        self._serving.watch(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.end()

    @property
    def held_s(self) -> float:
        """Time the candidate has spent stopped so far, the current hold included."""
        current = 0.0 if self._stopped_at is None else time.monotonic() - self._stopped_at
        return self._held_before_s + current

    def figures(self) -> dict[str, Any]:
        """What the OTA reports show as `candidate_held`."""
        return {"held_ms": round(self.held_s * 1000, 1), "times": self.times,
                "bound_reached": self.bound_reached, "max_held_s": self.max_held_s}

    # -- the serving worker's side (agent/inference/supervisor.py's RequestWatcher) -------------

    def request_started(self) -> None:
        self._serving_busy = True
        self._stop()

    def request_ended(self) -> None:
        self._serving_busy = False
        self._continue()

    # -- the candidate worker's side (agent/inference/supervisor.py's Hold) -------------------

    def attach(self, pid: int) -> None:
        """The candidate's new process (its group id): held at once if a request is in flight."""
        if self._ended:
            return
        self._pid = pid
        if self._serving_busy:
            self._stop()

    def detach(self) -> None:
        """The candidate's process is being killed or has exited: continued, and no signal
        goes to its group id again (another group could take it once the group is empty)."""
        self._continue()
        self._pid = None

    def end(self) -> None:
        """For good (promotion, refusal, close, cancel): continued and never held again."""
        self.detach()
        if not self._ended:
            self._ended = True
            self._serving.unwatch(self)

    @asynccontextmanager
    async def deadline(self, delay_s: float) -> AsyncIterator[None]:
        """asyncio.timeout(delay_s) whose clock stands still while the candidate is held."""
        held = self._stopped_at is not None
        async with asyncio.timeout(None if held else delay_s) as timeout:
            self._deadlines[timeout] = delay_s if held else None
            try:
                yield
            finally:
                del self._deadlines[timeout]

    # -- the signals --------------------------------------------------------------------------

    def _stop(self) -> None:
        if self._pid is None or self._stopped_at is not None or self.bound_reached:
            return
        loop = asyncio.get_running_loop()
        _signal_group(self._pid, signal.SIGSTOP)
        self._stopped_at = time.monotonic()
        self.times += 1
        self._bound = loop.call_later(max(0.0, self.max_held_s - self._held_before_s),
                                      self._reach_bound)
        now = loop.time()
        for timeout in self._deadlines:
            when = timeout.when()
            if when is not None and not timeout.expired():
                self._deadlines[timeout] = max(0.0, when - now)
                timeout.reschedule(None)

    def _continue(self) -> None:
        if self._stopped_at is None:
            return
        if self._pid is not None:
            _signal_group(self._pid, signal.SIGCONT)
        self._held_before_s += time.monotonic() - self._stopped_at
        self._stopped_at = None
        if self._bound is not None:
            self._bound.cancel()
            self._bound = None
        now = asyncio.get_running_loop().time()
        for timeout, left_s in self._deadlines.items():
            if left_s is not None and not timeout.expired():
                self._deadlines[timeout] = None
                timeout.reschedule(now + left_s)

    def _reach_bound(self) -> None:
        self._bound = None
        self._continue()
        self.bound_reached = True
        log.warning("candidate_hold_bound_reached", pid=self._pid, **self.figures(),
                    effect="the candidate runs beside the serving worker (still under "
                    "SCHED_IDLE) until it is promoted or refused; readings may take longer")


def _signal_group(pid: int, signum: signal.Signals) -> None:
    """`signum` to the candidate's group; nothing if it is already empty (the worker exited
    and the supervisor has not seen it yet). Never raises into the serving worker's request,
    which calls this."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
