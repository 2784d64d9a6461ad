"""Pipeline: lease a reading from the inbox, build its route's prompt, infer, and record the result.

The result goes to the outbox and the reading leaves the inbox in one transaction. A worker crash
or missed deadline releases the reading for another attempt, up to `pipeline.max_attempts`, then
dead-letters it. An answer that fails the route's schema is retried within the route's bound,
then recorded as a failed result with the raw text: never passed on as if it were valid.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import structlog

from agent.config import Route, Settings
from agent.errors import PermanentError, StoreFull, TransientError
from agent.executors import Executors
from agent.liveness import Liveness
from agent.messages import Topics, dead_letter_row, result_row
from agent.records import Completion, DeadLetter, ModelInfo, NewOutboxRow, Reading
from agent.retry import Backoff, OutageLog
from agent.routes import build_messages, prompt_version
from agent.store import Store
from agent.validation import check_output
from agent.waits import first_of

log = structlog.get_logger()

# Retries of an answer that failed the schema sample rather than decode greedily, or the retry
# would repeat the same answer.
RETRY_TEMPERATURE = 0.8


class PipelineObserver(Protocol):
    """Told about every reading the pipeline finishes (agent/metrics.py implements it)."""

    def result_recorded(
        self, route: str, executor: str, outcome: str, completion: Completion | None
    ) -> None: ...


class Completer(Protocol):
    """One model answering chat completions (agent/inference.py, agent/serving.py)."""

    @property
    def info(self) -> ModelInfo: ...

    async def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float, seed: int,
        schema: dict[str, Any] | None, prefix_key: str | None = None,
    ) -> Completion: ...


class Models(Protocol):
    """Where the model for one reading comes from: every attempt for a reading uses the model
    it leased, and the result names that model, even if traffic is switched meanwhile."""

    def lease(self) -> AbstractAsyncContextManager[Completer]: ...


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        worker: Models,
        topics: Topics,
        observer: PipelineObserver | None = None,
        executors: Executors | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._worker = worker
        self._topics = topics
        self._routes = {route.name: route for route in settings.routes}
        self._versions = {route.name: prompt_version(route) for route in settings.routes}
        self.completed = 0
        self.liveness = Liveness("pipeline")
        self.observer = observer
        self.executors = executors or Executors()  # where each reading runs (local, cloud)

    def apply(self, settings: Settings) -> None:
        """Take reloaded routes and retry policy; the reading in hand finishes as it began."""
        self._settings = settings
        self._routes = {route.name: route for route in settings.routes}
        self._versions = {route.name: prompt_version(route) for route in settings.routes}

    async def run(self, stop: asyncio.Event) -> None:
        """Process readings until `stop` is set; the reading in hand is always finished first."""
        while not stop.is_set():
            # Clear before leasing: a reading committed after the lease found none sets it again.
            self._store.inbox_changed.clear()
            self.liveness.busy()
            reading = await self._store.lease()
            if reading is None:
                self.liveness.idle("waiting for input")
                await first_of(self._store.inbox_changed, stop)
                continue
            try:
                await self.process(reading)
            except StoreFull as exc:
                # Only a release after a failed attempt gets here; the reading stays leased
                # until the next start, which frees every lease. Nothing is lost.
                log.warning("pipeline_release_failed", id=reading.id, error=str(exc))
                await asyncio.sleep(self._settings.pipeline.retry_backoff_s)

    async def process(self, reading: Reading) -> None:
        route = self._routes.get(reading.route)
        if route is None:
            await self._dead_letter(reading, f"route {reading.route!r} is no longer configured")
            return
        try:
            await self._infer_and_record(route, reading)
        except TransientError as exc:
            if reading.attempts >= self._settings.pipeline.max_attempts:
                await self._dead_letter(
                    reading, f"inference failed {reading.attempts} times; last: {exc}"
                )
                return
            log.warning("inference_retry", id=reading.id, attempt=reading.attempts, error=str(exc))
            await self._store.release(reading.id)
            self.liveness.idle("retry backoff")
            await asyncio.sleep(self._settings.pipeline.retry_backoff_s)
        except PermanentError as exc:
            await self._dead_letter(reading, f"inference refused the reading: {exc}")

    async def _infer_and_record(self, route: Route, reading: Reading) -> None:
        source = json.loads(reading.payload)
        messages = build_messages(route, reading.topic, reading.payload.decode())
        completion: Completion | None = None
        error: str | None = None
        output: Any = None
        plan = await self.executors.plan(route)  # local, cloud, or one then the other
        outcome = None
        async with self._worker.lease() as model:
            for attempt in range(route.output_attempts):
                # The worker judges its own request against the stall bound (its Liveness).
                self.liveness.idle("inference worker has the reading")
                outcome = await self.executors.complete(
                    plan, model, route, messages,
                    temperature=route.temperature if attempt == 0 else max(route.temperature,
                                                                          RETRY_TEMPERATURE),
                    seed=self._settings.model.seed + attempt,
                )
                self.liveness.busy()
                completion, plan = outcome.completion, outcome.next_plan
                if route.output_schema is None:
                    output, error = completion.text, None
                    break
                output, error = check_output(completion.text, route.output_schema)
                if error is None:
                    break
                log.info("output_invalid", id=reading.id, route=route.name,
                         attempt=attempt + 1, error=error,
                         finish_reason=completion.finish_reason, executor=outcome.executor)
            # The model that answered: the leased local one, or the cloud's.
            info = outcome.model if outcome else model.info
        row = result_row(
            self._topics, reading, source,
            output=output if error is None else None,
            status="ok" if error is None else "failed",
            completion=completion,
            model=info,
            prompt_version=self._versions[route.name],
            error=error,
            raw=None if error is None or completion is None else completion.text,
            executor=outcome.executor if outcome else "local",
            executor_reason=outcome.reason if outcome else None,
        )
        await self._record(reading.id, row, None)
        self.completed += 1
        if self.observer is not None:
            executor = outcome.executor if outcome else "local"
            self.observer.result_recorded(route.name, executor,
                                          "ok" if error is None else "failed", completion)

    async def _dead_letter(self, reading: Reading, reason: str) -> None:
        log.warning("reading_dead_lettered", id=reading.id, topic=reading.topic, reason=reason)
        if self.observer is not None:
            self.observer.result_recorded(reading.route, "local", "dead_letter", None)
        letter = DeadLetter(reading.id, reading.topic, reading.payload, reason,
                            reading.received_at)
        await self._record(reading.id, dead_letter_row(self._topics, letter), letter)

    async def _record(self, reading_id: str, row: NewOutboxRow,
                      letter: DeadLetter | None) -> None:
        """Commit a result (or a dead letter); while the store is full, keep the answer and
        retry the commit with backoff instead of running inference again. The reading stays
        leased meanwhile; a stop or a crash frees it for the next start."""
        outage = OutageLog("pipeline_store")
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                if letter is None:
                    await self._store.complete(reading_id, row)
                else:
                    await self._store.dead_letter_reading(letter, row)
            except StoreFull as exc:
                outage.failed(exc, id=reading_id)
                await asyncio.sleep(backoff.next_delay())
                continue
            outage.recovered()
            return

