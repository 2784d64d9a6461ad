"""Carrying out a route's executor policy for one reading: ask agent/flows/offload.py for a plan,
run the completion on the local worker or the cloud model in that order, feed the circuit breaker
and the local latency window, and say which executor answered and why.

It owns no process and no connection: the local worker is passed in by the pipeline on each call
(so a model swap elsewhere changes nothing here) and the cloud client is owned by the app. It never
calls the cloud for a `local` route: the plan for such a route holds only the local executor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from agent.base.records import Completion, Generation, ModelInfo
from agent.config.settings import Route
from agent.flows.offload import CircuitBreaker, Executor, LatencyWindow, Plan, plan, preferred
from agent.inference.cloud import CloudError, CloudModel, CloudUnavailable
from agent.routing.prompts import prefix_key as prefix_key  # re-exported: specialize, tools

log = structlog.get_logger()

LOCAL_ONLY = Plan(("local",), None)


class LocalModel(Protocol):
    """What the executors need of the inference worker (agent/inference.InferenceWorker)."""

    @property
    def info(self) -> ModelInfo: ...

    async def complete(self, messages: list[dict[str, str]], generation: Generation
                       ) -> Completion: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """One completion and where it came from; `next_plan` is the plan for a retry of the same
    reading (after a cloud failure it no longer holds the cloud)."""

    completion: Completion
    executor: Executor
    reason: str | None
    model: ModelInfo
    next_plan: Plan


class Executors:
    def __init__(
        self,
        cloud: CloudModel | None = None,
        breaker: CircuitBreaker | None = None,
        backlog_depth: Callable[[], Awaitable[int]] | None = None,
        latency: LatencyWindow | None = None,
    ) -> None:
        self._cloud = cloud
        self.breaker = breaker or CircuitBreaker(3, 30.0)
        self._backlog_depth = backlog_depth
        self.latency = latency or LatencyWindow()
        self.counts: Counter[Executor] = Counter()

    async def plan(self, route: Route) -> Plan:
        """Decide, once per reading, which executors to try in order."""
        if route.executor == "local" or self._cloud is None:
            return LOCAL_ONLY
        wait_ms = 0.0
        if route.executor == "local-first" and self._backlog_depth is not None:
            wait_ms = self.latency.backlog_wait_ms(await self._backlog_depth())
        chosen = plan(route.executor, cloud_allowed=self.breaker.allow, backlog_wait_ms=wait_ms,
                      latency_budget_ms=route.latency_budget_ms)
        if chosen.reason is not None:
            log.debug("executor_chosen", route=route.name, executors=list(chosen.executors),
                      reason=chosen.reason, backlog_wait_ms=round(wait_ms, 1),
                      breaker=self.breaker.state)
        return chosen

    async def complete(
        self,
        chosen: Plan,
        local: LocalModel,
        route: Route,
        messages: list[dict[str, str]],
        *,
        temperature: float,
        seed: int,
    ) -> Outcome:
        """Run the plan: the first executor that answers wins. A cloud failure feeds the
        breaker and falls through to the next executor; a failure of the last one is raised."""
        if not chosen.executors:
            raise CloudUnavailable("cloud circuit open",
                                   f"route {route.name} runs only in the cloud")
        want = preferred(route.executor)
        reason = chosen.reason
        generation = Generation(route.max_tokens, temperature, seed, route.output_schema,
                                prefix_key(route))
        for index, executor in enumerate(chosen.executors):
            if executor == "local":
                completion = await local.complete(messages, generation)
                self.latency.add(completion.latency_ms)
                self.counts["local"] += 1
                return Outcome(completion, "local", reason if want != "local" else None,
                               local.info, Plan(("local",), reason))
            assert self._cloud is not None
            try:
                answer = await self._cloud.complete(messages, generation)
            except CloudError as exc:
                self._record(success=False)
                last = index + 1 == len(chosen.executors)
                log.warning("cloud_inference_failed", route=route.name, reason=exc.reason,
                            error=str(exc), breaker=self.breaker.state,
                            next_executor=None if last else chosen.executors[index + 1])
                if last:
                    raise
                reason = f"fallback: {exc.reason}"
                continue
            self._record(success=True)
            self.counts["cloud"] += 1
            return Outcome(answer.completion, "cloud", reason if want != "cloud" else None,
                           answer.model, chosen)
        raise AssertionError("a plan always ends in an executor that answers or raises")

    def _record(self, *, success: bool) -> None:
        before = self.breaker.state
        if success:
            self.breaker.record_success()
        else:
            self.breaker.record_failure()
        after = self.breaker.state
        if before != after and after == "open":
            log.warning("cloud_breaker_opened", opened=self.breaker.opened)
        elif before != after and after == "closed":
            log.info("cloud_breaker_closed")
