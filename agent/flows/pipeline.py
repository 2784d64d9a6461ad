"""Pipeline: lease a reading (or a window of readings) from the inbox, build its route's prompt,
infer, and record the result.

The result goes to the outbox and the reading leaves the inbox in one transaction. A worker crash
or missed deadline releases the reading for another attempt, up to `pipeline.max_attempts`, then
dead-letters it. An answer that fails the route's schema is retried within the route's bound,
then recorded as a failed result with the raw text: never passed on as if it were valid.
A windowed route's readings are answered together (agent/routing/windows.py): one result covers
them, and it is recorded and they are retired in one transaction. A window that is not full stays
open while it waits for more readings of its route, and the pipeline answers other routes'
readings meanwhile: a waiting window never holds the pipeline (issue 16).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from agent.base.errors import AgentError, PermanentError, Unavailable
from agent.base.liveness import Liveness
from agent.base.records import Answer, Completion, DeadLetter, NewOutboxRow, Reading
from agent.base.retry import Backoff, OutageEvents, OutageLog, retry_while_full
from agent.base.validation import check_output
from agent.base.waits import first_of, wait_or_timeout, wait_or_timeout_any
from agent.config.settings import Route, Settings
from agent.flows.executors import Executors, LocalModel
from agent.routing.outbound import Topics, dead_letter_row, result_row
from agent.routing.prompts import build_messages, prompt_version
from agent.routing.windows import (
    OpenWindow,
    build_window_messages,
    due_first,
    window_id,
    window_prompt_version,
    window_result_row,
)
from agent.store.writer import Store

LOOP_EVENTS = OutageEvents(
    "pipeline_loop_failed", "pipeline_loop_failing",
    "pipeline_loop_recovered",
)
STORE_EVENTS = OutageEvents(
    "pipeline_store_failed", "pipeline_store_failing",
    "pipeline_store_recovered",
)

log = structlog.get_logger()

# Retries of an answer that failed the schema sample rather than decode greedily, or the retry
# would repeat the same answer.
RETRY_TEMPERATURE = 0.8
# The longest a route waits between tries of an unavailable executor (the cloud's breaker
# cool-down is 30 s by default: a route tries again soon after the breaker lets a probe through).
PARK_MAX_S = 30.0
PARK_MIN_S = 0.2

@dataclass(slots=True)
class _Parked:
    """A route waiting for its executor: when it may be tried again, and since when."""

    backoff: Backoff
    since: float
    until: float = 0.0
    reason: str = ""


def _unforeseen(exc: Exception) -> Exception | None:
    """The exception itself for a log's exc_info when nobody foresaw it (not an AgentError)."""
    return None if isinstance(exc, AgentError) else exc


def _describe(exc: Exception) -> str:
    """A failure for a dead letter's reason: an unforeseen one names its type."""
    return str(exc) if isinstance(exc, AgentError) else f"{type(exc).__name__}: {exc}"


class PipelineObserver(Protocol):
    """Told about every reading the pipeline finishes (agent/service/metrics.py implements it)."""

    def result_recorded(
        self, route: str, executor: str, outcome: str, completion: Completion | None
    ) -> None: ...

    def route_waits(self, route: str, waiting: bool) -> None: ...


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
        # Routes whose executor is unavailable (agent/errors.Unavailable), by name.
        self._parked: dict[str, _Parked] = {}
        # Windows leased and waiting for more readings, by route: at most one per route.
        self._open: dict[str, OpenWindow] = {}

    def apply(self, settings: Settings) -> None:
        """Take reloaded routes and retry policy; the reading in hand finishes as it began."""
        self._settings = settings
        self._routes = {route.name: route for route in settings.routes}
        self._versions = {route.name: prompt_version(route) for route in settings.routes}

    async def run(self, stop: asyncio.Event) -> None:
        """Process readings until `stop` is set; the reading in hand is always finished first,
        and so is every window waiting for more readings (answered with what it holds).

        Nothing that goes wrong with one reading, or with one round of the loop (a full store,
        an error nobody foresaw), ends the loop: it is logged, and the loop goes on after a
        backoff. Readings in hand when a round fails stay leased until the next start."""
        failures = OutageLog(LOOP_EVENTS)
        backoff = Backoff(self._settings.pipeline.retry_backoff_s, 30.0)
        # After a stop each round answers at least one open window (or fails with it), so the
        # loop ends.
        while not stop.is_set() or self._open:
            try:
                await self._step(stop)
            except Exception as exc:  # the loop outlives any one round (STYLE.md 2)
                failures.failed(exc, error_type=type(exc).__name__, exc_info=exc)
                self.liveness.idle("pipeline backoff after a failed round")
                await wait_or_timeout(stop, backoff.next_delay())
            else:
                failures.recovered()
                backoff.reset()

    async def _step(self, stop: asyncio.Event) -> None:
        """Answer what is ready, highest priority first: open windows that are due (full, or
        their wait over), and the next reading of the other routes; on a tie the window goes
        first. A window that is not full stays open and waits without holding the loop. With
        nothing ready, wait for input, a window's deadline or a parked route's retry."""
        # Read and clear before leasing: a reading committed after this sets it again.
        news = self._store.inbox_changed.is_set()
        self._store.inbox_changed.clear()
        self.liveness.busy()
        stopping = stop.is_set()
        if not stopping and (news or self._any_due()):
            await self._top_up()
        now = time.monotonic()
        due = [window for window in self._open.values()
               if stopping or window.due(self._routes.get(window.route), now)]
        leased = [] if stopping else await self._lease()
        if isinstance(leased, OpenWindow):
            leased.readings = [r for r in leased.readings if not await self._over_limit(r)]
            if not leased.readings:
                return  # each one dead-lettered: look again
            self._open[leased.route] = leased
            if leased.due(self._routes.get(leased.route), time.monotonic()):
                due.append(leased)
            elif not due:
                return  # it waits: look again for the other routes' readings
            leased = []
        if not leased and not due:
            self.liveness.idle("filling a window" if self._open else "waiting for input")
            wake = self._next_wake()
            if wake is None:
                await first_of(self._store.inbox_changed, stop)
            else:
                await wait_or_timeout_any((self._store.inbox_changed, stop), wake)
            return
        # Priority as the store leases; due windows of lower priority than the leased readings
        # stay open and go in a later round.
        for window in due_first(due):
            if leased and window.priority < leased[0].priority:
                break
            # Taken out only now: a round that fails leaves the others open for the next one.
            del self._open[window.route]
            await self.process_window(window.readings)
        if len(leased) > 1:
            # A backlog of a local route: its readings in flight together, which the worker's
            # supervisor decodes in one batch (issue 16); each is its own unit.
            await asyncio.gather(*(self.process(reading) for reading in leased))
        elif leased:
            await self.process(leased[0])

    def _any_due(self) -> bool:
        now = time.monotonic()
        return any(w.due(self._routes.get(w.route), now) for w in self._open.values())

    async def _top_up(self) -> None:
        """Lease for each open window the readings of its route that came since."""
        for window in self._open.values():
            want = window.wants(self._routes.get(window.route))
            if want > 0:
                window.readings.extend(await self._store.lease_route(window.route, want))

    async def _lease(self) -> list[Reading] | OpenWindow:
        """The next readings of a route that is neither parked nor has a window open: one, or
        several of a local route's backlog (lease_window's coalescing, _backlog_sizes), or a
        windowed route's next window; none when nothing is free."""
        exclude = sorted({*self._parked_now(), *self._open})
        windows = self._window_sizes()
        backlog = self._backlog_sizes()
        if not windows and not backlog:
            reading = await self._store.lease(exclude=exclude)
            return [] if reading is None else [reading]
        leased = await self._store.lease_window({**backlog, **windows}, exclude=exclude)
        route = self._routes.get(leased[0].route) if leased else None
        if route is None or not route.windowed:
            return leased  # (a route gone in a reload leases one reading: dead-lettered)
        return OpenWindow(route.name, leased,
                          time.monotonic() + route.window_max_wait_ms / 1000)

    def _backlog_sizes(self) -> dict[str, tuple[int, int]]:
        """(1, readings in flight at most) of each local route: one reading unless its route
        has more waiting (lease_window's coalescing), at most as many as the worker decodes in
        one batch (`[model] max_batch`; 1: one reading at a time)."""
        backlog = self._settings.model.max_batch
        if backlog <= 1:
            return {}
        return {route.name: (1, backlog) for route in self._routes.values()
                if route.executor == "local" and not route.windowed}

    def _window_sizes(self) -> dict[str, tuple[int, int]]:
        """(window_max_readings, window cap) of each windowed route."""
        return {route.name: (route.window_max_readings, route.window_cap)
                for route in self._routes.values() if route.windowed}

    async def process_window(self, window: list[Reading]) -> None:
        """Answer leased readings of one windowed route with one result covering all of them.

        A failed attempt releases every reading; a reading at `pipeline.max_attempts` is
        dead-lettered on its own with the reason, the others are released for the next window.
        When no executor can answer, the readings go back with their attempts refunded and the
        route waits."""
        route = self._routes.get(window[0].route)
        if route is None or not route.windowed:
            for reading in window:
                await self.process(reading)  # dead-lettered or answered on its own
            return
        window = [reading for reading in window if not await self._over_limit(reading)]
        if not window:
            return
        try:
            await self._infer_and_record_window(route, window)
        except Unavailable as exc:
            await self._commit(window[0].id, lambda: self._store.release_many(
                [r.id for r in window], refund=True))
            self._park(route, exc)
        except PermanentError as exc:
            for reading in window:
                await self._dead_letter(
                    reading, f"inference refused the window of {len(window)}: {exc}")
        except Exception as exc:  # any failure of this window counts as an attempt on each
            limit = self._settings.pipeline.max_attempts
            for reading in window:
                if reading.attempts >= limit:
                    await self._dead_letter(
                        reading, f"inference failed {reading.attempts} times in a window of "
                        f"{len(window)}; last: {_describe(exc)}")
            rest = [reading.id for reading in window if reading.attempts < limit]
            if rest:
                log.warning("window_retry", route=route.name, readings=len(window),
                            released=len(rest), error=_describe(exc),
                            exc_info=_unforeseen(exc))
                await self._commit(rest[0], lambda: self._store.release_many(rest))
            self.liveness.idle("retry backoff")
            await asyncio.sleep(self._settings.pipeline.retry_backoff_s)
        else:
            self._unpark(route)

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
        """Answer one leased reading, or put it back, or dead-letter it with the reason.

        Any exception while processing it counts as an attempt on it (a poison pill of a kind
        nobody foresaw included); after `pipeline.max_attempts` it is dead-lettered. A failure
        that is not the reading's fault (agent/errors.Unavailable: the model does not load, the
        cloud is down) refunds the attempt, and the route waits for its executor."""
        route = self._routes.get(reading.route)
        if route is None:
            await self._dead_letter(reading, f"route {reading.route!r} is no longer configured")
            return
        if await self._over_limit(reading):
            return
        try:
            await self._infer_and_record(route, reading)
        except Unavailable as exc:
            await self._commit(reading.id,
                               lambda: self._store.release(reading.id, refund=True))
            self._park(route, exc)
        except PermanentError as exc:
            await self._dead_letter(reading, f"inference refused the reading: {exc}")
        except Exception as exc:  # transient, or unforeseen: either way one attempt used
            if reading.attempts >= self._settings.pipeline.max_attempts:
                await self._dead_letter(
                    reading, f"inference failed {reading.attempts} times; last: "
                    f"{_describe(exc)}")
                return
            log.warning("inference_retry", id=reading.id, attempt=reading.attempts,
                        error=_describe(exc), exc_info=_unforeseen(exc))
            await self._commit(reading.id, lambda: self._store.release(reading.id))
            self.liveness.idle("retry backoff")
            await asyncio.sleep(self._settings.pipeline.retry_backoff_s)
        else:
            self._unpark(route)

    async def _over_limit(self, reading: Reading) -> bool:
        """Dead-letter a reading leased more often than `max_attempts` without an outcome: the
        agent stopped or crashed while it was in hand each time, and it may be the cause."""
        limit = self._settings.pipeline.max_attempts
        if reading.attempts <= limit:
            return False
        await self._dead_letter(
            reading, f"leased {reading.attempts} times without an outcome (limit {limit}): the "
            "agent stopped or crashed while processing it")
        return True

    def _park(self, route: Route, exc: Unavailable) -> None:
        """No executor could take the route's reading: its readings wait in the inbox while
        other routes go on; the route is tried again after a backoff."""
        parked = self._parked.get(route.name)
        if parked is None:
            parked = self._parked[route.name] = _Parked(
                Backoff(max(self._settings.pipeline.retry_backoff_s, PARK_MIN_S), PARK_MAX_S),
                time.monotonic())
            log.error("route_waiting_for_executor", route=route.name, error=str(exc),
                      executor=route.executor)
            if self.observer is not None:
                self.observer.route_waits(route.name, True)
        parked.until = time.monotonic() + parked.backoff.next_delay()
        parked.reason = str(exc)

    def _unpark(self, route: Route) -> None:
        parked = self._parked.pop(route.name, None)
        if parked is not None:
            log.info("route_executor_recovered", route=route.name,
                     waited_s=round(time.monotonic() - parked.since, 1))
            if self.observer is not None:
                self.observer.route_waits(route.name, False)

    def _parked_now(self) -> list[str]:
        """Routes whose readings must not be leased now (waiting for an executor)."""
        now = time.monotonic()
        return sorted(name for name, parked in self._parked.items() if parked.until > now)

    def _next_wake(self) -> float | None:
        """Seconds until an open window's wait ends or a parked route may be tried again."""
        now = time.monotonic()
        ahead = [w.deadline - now for w in self._open.values()]
        unpark = self._next_unpark()
        if unpark is not None:
            ahead.append(unpark)
        return max(0.0, min(ahead)) if ahead else None

    def _next_unpark(self) -> float | None:
        """Seconds until the next waiting route may be tried again; None if none is held back
        now (a route whose wait is over stays parked until it answers, but has nothing to wake
        for: waking for it with no reading of it in the inbox would spin)."""
        now = time.monotonic()
        ahead = [p.until - now for p in self._parked.values() if p.until > now]
        return min(ahead) if ahead else None

    @property
    def waiting_routes(self) -> dict[str, str]:
        """Routes waiting for an executor, with the reason (for metrics and the status)."""
        return {name: parked.reason for name, parked in self._parked.items()}

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

    def _observe(self, route: Route, answer: Answer) -> None:
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
        await retry_while_full(STORE_EVENTS, commit, id=row_id)

