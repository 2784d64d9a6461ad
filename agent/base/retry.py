"""Retry pacing on monotonic time: capped exponential backoff with full jitter, an outage
log that reports the first failure, then at most once per interval with a count, then recovery,
and the one loop that retries a store commit while the store is full.

No I/O of its own: it reads `time.monotonic` and sleeps.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from agent.base.errors import StoreFull

T = TypeVar("T")


class Backoff:
    """Delays for successive retries: random in [base/2, min(cap, base * 2**n)].

    Full jitter keeps a fleet of gateways from reconnecting in lock-step after a shared outage.
    """

    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None) -> None:
        self._base = base_s
        self._cap = max(cap_s, base_s)
        self._rng = rng or random.Random()
        self._failures = 0

    def next_delay(self) -> float:
        ceiling = min(self._cap, self._base * 2.0 ** min(self._failures, 30))
        self._failures += 1
        return max(self._base / 2, self._rng.uniform(0, ceiling))

    def reset(self) -> None:
        self._failures = 0


@dataclass(frozen=True, slots=True)
class OutageEvents:
    """The three event names of one outage, each spelled out where it is defined so that a
    name in the README, a test or a journal search is found by grep."""

    failed: str
    failing: str
    recovered: str


class OutageLog:
    """Logs `events.failed` on the first error, then `events.failing` once per `interval_s`
    with a count, and `events.recovered` when it works again, so a long outage does not flood
    the journal."""

    def __init__(
        self,
        events: OutageEvents,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._events = events
        self._interval = interval_s
        self._clock = clock
        self._log = structlog.get_logger()
        self._failures = 0
        self._since = 0.0
        self._last_logged = 0.0

    @property
    def failing(self) -> bool:
        return self._failures > 0

    def failed(self, error: BaseException, **data: object) -> None:
        now = self._clock()
        self._failures += 1
        if self._failures == 1:
            self._since = self._last_logged = now
            self._log.warning(self._events.failed, error=str(error), **data)
        elif now - self._last_logged >= self._interval:
            self._last_logged = now
            self._log.warning(self._events.failing, error=str(error),
                              failures=self._failures,
                              for_s=round(now - self._since, 1), **data)

    def recovered(self, **data: object) -> None:
        if self._failures:
            self._log.info(self._events.recovered, failures=self._failures,
                           after_s=round(self._clock() - self._since, 1), **data)
        self._failures = 0


async def retry_while_full(events: OutageEvents, commit: Callable[[], Awaitable[T]],
                           **data: object) -> T:
    """Run a store commit; while the store is full (StoreFull), log it as `events.failed` and
    commit again after a backoff (0.2 s to 5 s) instead of giving the work up: redoing it (an
    inference, a resend) would meet the same full store. A stop cancels the waiting task."""
    outage = OutageLog(events)
    backoff = Backoff(0.2, 5.0)
    while True:
        try:
            result = await commit()
        except StoreFull as exc:
            outage.failed(exc, **data)
            await asyncio.sleep(backoff.next_delay())
            continue
        outage.recovered()
        return result
