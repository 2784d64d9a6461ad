"""Where a reading runs: the executor policy of a route, the cloud's circuit breaker, and the
estimate of the wait in the local backlog.

Pure logic on an injected monotonic clock; no I/O, no asyncio. It decides, in order, which
executors to try for one reading and why the first one is not the route's preferred executor;
agent/flows/executors.py carries the decision out. A `local` route's plan never contains the cloud:
that is the guarantee that such a route's data does not leave the device.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Executor = Literal["local", "cloud"]
Policy = Literal["local", "cloud", "local-first", "cloud-first"]

# Reasons recorded in a result's `executor_reason` when it ran elsewhere than preferred.
OFFLOAD_BACKLOG = "offload: local backlog"
FALLBACK_CIRCUIT_OPEN = "fallback: cloud circuit open"


def preferred(policy: Policy) -> Executor:
    """The executor a route asks for first."""
    return "cloud" if policy in ("cloud", "cloud-first") else "local"


@dataclass(frozen=True, slots=True)
class Plan:
    """Executors to try in order, and why the first is not the preferred one (None if it is)."""

    executors: tuple[Executor, ...]
    reason: str | None


def plan(
    policy: Policy,
    *,
    cloud_allowed: Callable[[], bool],
    backlog_wait_ms: float,
    latency_budget_ms: float | None,
) -> Plan:
    """Choose the executors for one reading.

    `cloud_allowed` asks the breaker (False while it is open; in half-open it grants the probe,
    so it is called only when the cloud would really be used); `backlog_wait_ms` is the
    estimated wait in the local backlog. A `cloud` route with the breaker open gets an empty plan:
    the caller treats that as a transient failure of the reading.
    """
    if policy == "local":
        return Plan(("local",), None)
    if policy == "cloud":
        return Plan(("cloud",) if cloud_allowed() else (), None)
    if policy == "cloud-first":
        if cloud_allowed():
            return Plan(("cloud", "local"), None)
        return Plan(("local",), FALLBACK_CIRCUIT_OPEN)
    # local-first: offload only when the backlog would make this reading miss its budget and
    # the cloud is believed up; a cloud failure then falls back to the local model.
    over_budget = latency_budget_ms is not None and backlog_wait_ms > latency_budget_ms
    if over_budget and cloud_allowed():
        return Plan(("cloud", "local"), OFFLOAD_BACKLOG)
    return Plan(("local",), None)


class CircuitBreaker:
    """Closed -> open after `failure_threshold` consecutive failures -> half-open after
    `cooldown_s`, when exactly one probe request is let through: success closes the breaker,
    failure opens it for another cool-down. Times come from `clock` (monotonic seconds).
    """

    def __init__(
        self,
        failure_threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failure_threshold
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self.opened = 0  # how many times it opened, for logs and tests

    @property
    def state(self) -> Literal["closed", "open", "half-open"]:
        if self._opened_at is None:
            return "closed"
        if self._probing or self._clock() - self._opened_at >= self._cooldown_s:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        """May a request go to the cloud now? In half-open, True once, for the probe."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probing or (self._opened_at is None and self._failures >= self._threshold):
            self._opened_at = self._clock()
            self.opened += 1
        self._probing = False


class LatencyWindow:
    """Mean of the most recent local inference latencies."""

    def __init__(self, size: int = 20) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, latency_ms: float) -> None:
        self._samples.append(latency_ms)

    @property
    def mean_ms(self) -> float:
        """0.0 before any sample: with nothing measured, nothing is offloaded."""
        return sum(self._samples) / len(self._samples) if self._samples else 0.0

    def backlog_wait_ms(self, depth: int) -> float:
        """Estimated time to work through `depth` readings on the local model."""
        return depth * self.mean_ms
