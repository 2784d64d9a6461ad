"""Executor policy and circuit breaker: pure logic on an injected clock."""

from __future__ import annotations

import pytest

from agent.flows.offload import (
    FALLBACK_CIRCUIT_OPEN,
    OFFLOAD_BACKLOG,
    CircuitBreaker,
    LatencyWindow,
    Plan,
    plan,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_a_success_resets_the_count() -> None:
    """Two failures, a success, two failures: still closed; the third in a row opens it."""
    breaker = CircuitBreaker(3, 10.0, clock=Clock())
    for _ in range(2):
        breaker.record_failure()
    breaker.record_success()
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state == "closed"
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    assert breaker.opened == 1


def test_open_breaker_lets_one_probe_through_after_the_cooldown() -> None:
    """Open until the cool-down has passed on the monotonic clock, then exactly one probe; a
    failed probe opens it for another cool-down, a successful one closes it."""
    clock = Clock()
    breaker = CircuitBreaker(1, 10.0, clock=clock)
    breaker.record_failure()
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.state == "half-open"
    assert breaker.allow()
    assert not breaker.allow()  # the probe is in flight: nobody else goes
    breaker.record_failure()
    assert breaker.state == "open"
    assert breaker.opened == 2
    clock.now += 10.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.allow()
    assert breaker.allow()


@pytest.mark.parametrize("cloud_up", [True, False])
@pytest.mark.parametrize("wait_ms", [0.0, 1e9])
def test_a_local_route_never_plans_the_cloud(cloud_up: bool, wait_ms: float) -> None:
    """Whatever the backlog and the cloud's state, `local` means the local model only, and the
    breaker is not even asked."""
    asked: list[int] = []

    def allowed() -> bool:
        asked.append(1)
        return cloud_up

    result = plan("local", cloud_allowed=allowed, backlog_wait_ms=wait_ms, latency_budget_ms=1)
    assert result == Plan(("local",), None)
    assert asked == []


def test_cloud_first_tries_the_cloud_then_local_and_goes_local_while_the_breaker_is_open() -> None:
    assert plan("cloud-first", cloud_allowed=lambda: True, backlog_wait_ms=0,
                latency_budget_ms=None) == Plan(("cloud", "local"), None)
    assert plan("cloud-first", cloud_allowed=lambda: False, backlog_wait_ms=0,
                latency_budget_ms=None) == Plan(("local",), FALLBACK_CIRCUIT_OPEN)


def test_local_first_offloads_only_over_budget_and_only_when_the_cloud_is_up() -> None:
    """Under budget: local, and the breaker is not asked (a half-open probe is not wasted).
    Over budget: cloud then local, reason offload. Over budget with the cloud down: local."""
    asked: list[int] = []

    def up() -> bool:
        asked.append(1)
        return True

    assert plan("local-first", cloud_allowed=up, backlog_wait_ms=499,
                latency_budget_ms=500) == Plan(("local",), None)
    assert asked == []
    assert plan("local-first", cloud_allowed=up, backlog_wait_ms=501,
                latency_budget_ms=500) == Plan(("cloud", "local"), OFFLOAD_BACKLOG)
    assert plan("local-first", cloud_allowed=lambda: False, backlog_wait_ms=501,
                latency_budget_ms=500) == Plan(("local",), None)


def test_a_cloud_route_has_nothing_to_run_while_the_breaker_is_open() -> None:
    assert plan("cloud", cloud_allowed=lambda: False, backlog_wait_ms=0,
                latency_budget_ms=None) == Plan((), None)
    assert plan("cloud", cloud_allowed=lambda: True, backlog_wait_ms=0,
                latency_budget_ms=None) == Plan(("cloud",), None)


def test_backlog_wait_is_depth_times_the_recent_mean_local_latency() -> None:
    window = LatencyWindow(size=3)
    assert window.backlog_wait_ms(100) == 0.0  # nothing measured yet: no offload
    for latency in (10.0, 1000.0, 20.0, 30.0):  # the oldest falls out of the window
        window.add(latency)
    assert window.mean_ms == pytest.approx(350.0)
    assert window.backlog_wait_ms(4) == pytest.approx(1400.0)
