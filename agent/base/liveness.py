"""Liveness of one critical loop: when it last made progress, or why it is idle.

Pure logic on monotonic time, no I/O. Ingest, pipeline, uplink and the inference worker each own
one `Liveness` and mark it around their units of work; agent/service/systemd.py reads them to decide
whether systemd's watchdog may be pinged. A loop is healthy when it is idle for a known reason
(waiting for input, for the link, for a backoff) or has been busy for less than the stall bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Liveness:
    """Busy since a moment, or idle with a reason. Starts idle: nothing has been asked of it."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self.last_progress = clock()
        self.idle_reason: str | None = "starting"

    def busy(self) -> None:
        """A unit of work starts now; it must finish within the stall bound."""
        self.idle_reason = None
        self.last_progress = self._clock()

    def progressed(self) -> None:
        """A unit of work finished; the loop is still busy with the next one."""
        self.last_progress = self._clock()

    def idle(self, reason: str) -> None:
        """The loop waits for something outside it (input, the link, a backoff)."""
        self.idle_reason = reason
        self.last_progress = self._clock()

    def stalled_for(self, stall_after_s: float) -> float | None:
        """Seconds busy without progress if over `stall_after_s`, else None."""
        if self.idle_reason is not None:
            return None
        busy_s = self._clock() - self.last_progress
        return busy_s if busy_s > stall_after_s else None
