"""Which inference worker serves traffic, switched without failing a request, and what each
worker's traffic looked like.

The pipeline takes a lease for each reading and runs every attempt for that reading on the
worker it leased, so a switch never moves a request between models: the request in flight
finishes on the old worker, the next lease gets the new one, and the result's provenance names
the worker that produced it. Each answer is observed (wall latency, failure, schema validity)
into the serving model's window; agent/ota/updates.py judges probation from these windows.

Owns no process: workers are started and closed by agent/app.py and agent/ota/updates.py.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from agent.base.errors import AgentError
from agent.base.records import Completion, Generation, ModelInfo
from agent.base.validation import check_output
from agent.inference.supervisor import InferenceWorker

WINDOW = 200


@dataclass(frozen=True, slots=True)
class Figures:
    """What a window of traffic looked like."""

    requests: int
    errors: int
    schema_failures: int
    p95_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def schema_failure_rate(self) -> float:
        answered = self.requests - self.errors
        return self.schema_failures / answered if answered else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors,
                "schema_failures": self.schema_failures,
                "error_rate": round(self.error_rate, 3),
                "schema_failure_rate": round(self.schema_failure_rate, 3),
                "p95_ms": None if self.p95_ms is None else round(self.p95_ms, 1)}


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class Window:
    """The last WINDOW requests served by one model."""

    def __init__(self) -> None:
        self._latency: deque[float] = deque(maxlen=WINDOW)
        self._outcomes: deque[str] = deque(maxlen=WINDOW)  # "ok", "error", "schema"
        self.changed = asyncio.Event()

    def record(self, outcome: str, latency_ms: float | None) -> None:
        self._outcomes.append(outcome)
        if latency_ms is not None:
            self._latency.append(latency_ms)
        self.changed.set()

    def reset(self) -> None:
        self._latency.clear()
        self._outcomes.clear()

    def figures(self) -> Figures:
        outcomes = list(self._outcomes)
        return Figures(len(outcomes), outcomes.count("error"), outcomes.count("schema"),
                       p95(list(self._latency)))


class Served:
    """A worker while it can take traffic: its lease count and its window."""

    def __init__(self, worker: InferenceWorker) -> None:
        self.worker = worker
        self.window = Window()
        self.leases = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def info(self) -> ModelInfo:
        return self.worker.info

    async def complete(self, messages: list[dict[str, str]], generation: Generation
                       ) -> Completion:
        started = time.monotonic()
        schema = generation.schema
        try:
            completion = await self.worker.complete(messages, generation)
        except AgentError:
            self.window.record("error", None)
            raise
        latency_ms = (time.monotonic() - started) * 1000
        valid = schema is None or check_output(completion.text, schema)[1] is None
        self.window.record("ok" if valid else "schema", latency_ms)
        return completion


class WorkerSwitch:
    """Hands out the serving worker per reading; `switch` redirects the next lease."""

    def __init__(self, worker: InferenceWorker) -> None:
        self._serving = Served(worker)

    @property
    def serving(self) -> Served:
        return self._serving

    @property
    def info(self) -> ModelInfo:
        return self._serving.info

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Served]:
        served = self._serving
        served.leases += 1
        served.idle.clear()
        try:
            yield served
        finally:
            served.leases -= 1
            if served.leases == 0:
                served.idle.set()

    def switch(self, served: Served) -> Served:
        """Send the next lease to `served`; returns the one that was serving (still leased
        by the request in flight, if any: wait for its `idle` before closing its worker)."""
        previous, self._serving = self._serving, served
        return previous
