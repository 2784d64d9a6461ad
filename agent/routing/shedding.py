"""Load shedding per topic: a token bucket for each sensor topic, on monotonic time. Pure logic.

A sensor stuck in a tight loop must not crowd out every other stream. A topic may send
`rate_per_s` readings a second on average with bursts of `burst`; the excess is shed: ingest
dead-letters it with the reason (so it is counted, reported and acked, never silently dropped).
Memory stays bounded: at most `max_topics` buckets, the least recently seen forgotten first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TopicLimiter:
    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_topics: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate_per_s = rate_per_s
        self._burst = float(burst)
        self._max_topics = max_topics
        self._clock = clock
        # topic -> (tokens, when they were counted)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, topic: str) -> bool:
        """Take one token for the topic; False means shed this reading."""
        now = self._clock()
        tokens, then = self._buckets.pop(topic, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self.rate_per_s)
        allowed = tokens >= 1.0
        self._buckets[topic] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self._max_topics:
            self._buckets.popitem(last=False)
        return allowed
