"""Pipeline: lease a reading (or a window of readings) from the inbox, build its route's prompt,
infer, and record the result.

The result goes to the outbox and the reading leaves the inbox in one transaction. A worker crash
or missed deadline releases the reading for another attempt, up to `pipeline.max_attempts`, then
dead-letters it. An answer that fails the route's schema is retried within the route's bound,
then recorded as a failed result with the raw text: never passed on as if it were valid.
A windowed route's readings are answered together (agent/windows.py): one result covers them,
and it is recorded and they are retired in one transaction.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import structlog

from agent.config import Route, Settings
from agent.errors import PermanentError, StoreFull, TransientError, Unavailable
from agent.executors import Executors, LocalModel
from agent.liveness import Liveness
from agent.messages import Topics, dead_letter_row, result_row
from agent.records import Answer, Completion, DeadLetter, NewOutboxRow, Reading
from agent.retry import Backoff, OutageLog
from agent.routes import build_messages, prompt_version
from agent.store import Store
from agent.validation import check_output
from agent.waits import first_of, wait_or_timeout_any
from agent.windows import (
    build_window_messages,
    window_id,
    window_prompt_version,
    window_result_row,
)

log = structlog.get_logger()

# Retries of an answer that failed the schema sample rather than decode greedily, or the retry
# would repeat the same answer.
RETRY_TEMPERATURE = 0.8


class PipelineObserver(Protocol):
    """Told about every reading the pipeline finishes (agent/metrics.py implements it)."""

    def result_recorded(
        self, route: str, executor: str, outcome: str, completion: Completion | None
    ) -> None: ...


class Models(Protocol):
    """Where the model for one reading comes from: every attempt for a reading uses the model
    it leased, and the result names that model, even if traffic is switched meanwhile."""

    def lease(self) -> AbstractAsyncContextManager[LocalModel]: ...


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
        # Set while no executor answers (agent/errors.Unavailable): the backoff between tries.
        self._unavailable: Backoff | None = None

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
            windows = self._window_sizes()
            if windows:
                window = await self._store.lease_window(windows)
                if window and window[0].route in windows:
                    await self._run_window(window, stop)
                    continue
                reading = window[0] if window else None
            else:
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

    def _window_sizes(self) -> dict[str, tuple[int, int]]:
        """(window_max_readings, window cap) of each windowed route."""
        return {route.name: (route.window_max_readings, route.window_cap)
                for route in self._routes.values() if route.windowed}

    async def _run_window(self, window: list[Reading], stop: asyncio.Event) -> None:
        try:
            await self.process_window(window, stop)
        except StoreFull as exc:
            # As for one reading: the window stays leased until the next start.
            log.warning("pipeline_release_failed", ids=[r.id for r in window], error=str(exc))
            await asyncio.sleep(self._settings.pipeline.retry_backoff_s)

    async def process_window(self, window: list[Reading],
                             stop: asyncio.Event | None = None) -> None:
        """Answer leased readings of one windowed route with one result covering all of them.

        A window that is not full waits up to the route's window_max_wait_ms for more. A failed
        attempt releases every reading; a reading at `pipeline.max_attempts` is dead-lettered
        on its own with the reason, the others are released for the next window."""
        route = self._routes.get(window[0].route)
        if route is None or not route.windowed:
            for reading in window:
                await self.process(reading)  # dead-lettered or answered on its own
            return
        window = await self._fill_window(route, window, stop)
        try:
            await self._infer_and_record_window(route, window)
        except Unavailable as exc:
            await self._store.release_many([r.id for r in window], refund=True)
            await self._wait_for_executor(route, exc)
        except TransientError as exc:
            limit = self._settings.pipeline.max_attempts
            for reading in window:
                if reading.attempts >= limit:
                    await self._dead_letter(
                        reading, f"inference failed {reading.attempts} times in a window of "
                        f"{len(window)}; last: {exc}")
            rest = [reading.id for reading in window if reading.attempts < limit]
            if rest:
                log.warning("window_retry", route=route.name, readings=len(window),
                            released=len(rest), error=str(exc))
                await self._store.release_many(rest)
            self.liveness.idle("retry backoff")
            await asyncio.sleep(self._settings.pipeline.retry_backoff_s)
        except PermanentError as exc:
            for reading in window:
                await self._dead_letter(
                    reading, f"inference refused the window of {len(window)}: {exc}")

    async def _fill_window(self, route: Route, window: list[Reading],
                           stop: asyncio.Event | None) -> list[Reading]:
        """Lease more readings of the route until the window holds window_max_readings or
        window_max_wait_ms has passed (a window that grew under backlog is already full)."""
        want = route.window_max_readings - len(window)
        if want <= 0 or route.window_max_wait_ms == 0:
            return window
        window = list(window)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + route.window_max_wait_ms / 1000
        events = (self._store.inbox_changed,) if stop is None else (self._store.inbox_changed,
                                                                     stop)
        while True:
            self._store.inbox_changed.clear()
            more = await self._store.lease_route(route.name, want)
            window.extend(more)
            want -= len(more)
            remaining = deadline - loop.time()
            if want <= 0 or remaining <= 0 or (stop is not None and stop.is_set()):
                return window
            self.liveness.idle("filling a window")
            await wait_or_timeout_any(events, remaining)
            self.liveness.busy()

    async def _infer_and_record_window(self, route: Route, window: list[Reading]) -> None:
        ids = [reading.id for reading in window]
        answer = await self._infer(route, build_window_messages(route, window), window_id(ids))
        row = window_result_row(self._topics, window, answer, window_prompt_version(route))
        await self._commit(row.id, lambda: self._store.complete_window(ids, row))
        log.info("window_recorded", id=row.id, route=route.name, readings=len(window),
                 status="ok" if answer.error is None else "failed")
        self.completed += len(window)
        self._observe(route, answer)

    async def process(self, reading: Reading) -> None:
        route = self._routes.get(reading.route)
        if route is None:
            await self._dead_letter(reading, f"route {reading.route!r} is no longer configured")
            return
        try:
            await self._infer_and_record(route, reading)
        except Unavailable as exc:
            await self._store.release(reading.id, refund=True)
            await self._wait_for_executor(route, exc)
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
        answer = await self._infer(route, messages, reading.id)
        row = result_row(self._topics, reading, source, answer, self._versions[route.name])
        await self._record(reading.id, row, None)
        self.completed += 1
        self._observe(route, answer)

    async def _infer(self, route: Route, messages: list[dict[str, str]],
                     log_id: str) -> Answer:
        """Run the route's prompt through its executors, retrying an answer that fails the
        schema up to the route's bound."""
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
                log.info("output_invalid", id=log_id, route=route.name,
                         attempt=attempt + 1, error=error,
                         finish_reason=completion.finish_reason, executor=outcome.executor)
            # The model that answered: the leased local one, or the cloud's.
            info = outcome.model if outcome else model.info
        return Answer(
            output=output, error=error, completion=completion, model=info,
            raw=None if error is None or completion is None else completion.text,
            executor=outcome.executor if outcome else "local",
            executor_reason=outcome.reason if outcome else None,
        )

    async def _wait_for_executor(self, route: Route, exc: Unavailable) -> None:
        """No executor could take the reading (the model does not load, the cloud is down): it
        went back to the inbox with its attempt refunded; wait before the next try."""
        if self._unavailable is None:
            log.error("executor_unavailable", route=route.name, error=str(exc))
            self._unavailable = Backoff(self._settings.pipeline.retry_backoff_s, 30.0)
        self.liveness.idle("no executor answers")
        await asyncio.sleep(self._unavailable.next_delay())

    def _observe(self, route: Route, answer: Answer) -> None:
        if self._unavailable is not None:
            log.info("executor_recovered", route=route.name)
            self._unavailable = None
        if self.observer is not None:
            self.observer.result_recorded(route.name, answer.executor,
                                          "ok" if answer.error is None else "failed",
                                          answer.completion)

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
        if letter is None:
            await self._commit(reading_id, lambda: self._store.complete(reading_id, row))
        else:
            await self._commit(reading_id, lambda: self._store.dead_letter_reading(letter, row))

    async def _commit(self, row_id: str, commit: Callable[[], Awaitable[None]]) -> None:
        """Run one store commit; while the store is full, retry it with backoff."""
        outage = OutageLog("pipeline_store")
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                await commit()
            except StoreFull as exc:
                outage.failed(exc, id=row_id)
                await asyncio.sleep(backoff.next_delay())
                continue
            outage.recovered()
            return

