"""The SQLite store: inbox, outbox and dead letters, owned by one writer thread.

Owns the writer thread and the one read-write connection, which is created on that thread and
never leaves it; coroutines submit functions to the thread and get the answer back through
`loop.call_soon_threadsafe`, so nothing blocks the loop. Every hand-off between the agent's
stages goes through here, each as one transaction, so a crash at any point loses nothing that a
peer was told is safe. WAL with synchronous=FULL: a commit that returned survives power loss.
Speed comes from batching many rows per transaction, not from weaker sync. A SQLite error
raised on the thread is translated here, once, before it reaches the awaiting coroutine.

The store is five modules, the only agent modules that import sqlite3 or sqlite-utils: this
one (the thread and the async facade), agent/storeschema.py (connection, schema, the carried
clock), agent/storesql.py (the transactions the thread runs), agent/storequarantine.py (a
corrupt file moved aside at open) and agent/storeviews.py (read-only connections for the
operator's commands). This module holds no SQL of its own, and the functions of the others that
open or use a read-write connection run only on this module's writer thread.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import structlog

from agent import storesql
from agent.config import StoreSection
from agent.errors import StoreFull
from agent.records import DeadLetter, NewOutboxRow, OutboxRow, QueueStats, Reading
from agent.storequarantine import Quarantined, quarantine_if_corrupt
from agent.storeschema import connect, open_schema
from agent.storesql import IngestOutcome

log = structlog.get_logger()

T = TypeVar("T")


def _translate(exc: sqlite3.Error) -> Exception:
    text = str(exc).lower()
    if "full" in text:
        return StoreFull(f"store is full: {exc}")
    return exc


class Store:
    """Async facade over the writer thread. Open with `await Store.open(path)`, then `close()`."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop,
                 bounds: StoreSection | None = None) -> None:
        self.path = path
        self.bounds = bounds or StoreSection()
        self.quarantined: Quarantined | None = None
        self._loop = loop
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...],
                                            asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._conn: sqlite3.Connection | None = None
        # Set on the loop after a transaction adds rows; the pipeline and uplink wait on these.
        self.inbox_changed = asyncio.Event()
        self.outbox_changed = asyncio.Event()

    @classmethod
    async def open(cls, path: Path, bounds: StoreSection | None = None) -> Store:
        """Open (or create) the store. A database that fails `quick_check` is moved aside to
        `<dir>/quarantine/<time>/` with its -wal and -shm, and a fresh one is started."""
        path.parent.mkdir(parents=True, exist_ok=True)
        store = cls(path, asyncio.get_running_loop(), bounds)
        store._thread.start()
        try:
            await store._call(open_schema)
        except BaseException:
            await store.close()
            raise
        if store.quarantined is not None:
            log.critical("store_quarantined", path=str(path),
                         moved_to=str(store.quarantined.directory),
                         reason=store.quarantined.reason,
                         files=store.quarantined.files)
        return store

    async def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    # -- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.quarantined = quarantine_if_corrupt(self.path)
            self._conn = connect(self.path, self.bounds.max_page_count)
        except sqlite3.Error as exc:
            opening_error: Exception | None = _translate(exc)
        else:
            opening_error = None
        while True:
            job = self._jobs.get()
            if job is None:
                break
            fn, args, future = job
            try:
                if self._conn is None:
                    raise opening_error or RuntimeError("store connection is closed")
                result = fn(self._conn, *args)
            except sqlite3.Error as exc:
                self._loop.call_soon_threadsafe(_fail, future, _translate(exc))
            except Exception as exc:  # handed to the awaiting coroutine, which classifies it
                self._loop.call_soon_threadsafe(_fail, future, exc)
            else:
                self._loop.call_soon_threadsafe(_succeed, future, result)
        if self._conn is not None:
            self._conn.close()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((fn, args, future))
        return await future

    # -- the operations -----------------------------------------------------------------------

    async def ingest(
        self, readings: Sequence[Reading], dead: Sequence[tuple[DeadLetter, NewOutboxRow]]
    ) -> IngestOutcome:
        """Commit readings and dead letters in one transaction; after it, acking is safe."""
        outcome = await self._call(storesql.ingest, readings, dead, self.bounds)
        if outcome.accepted:
            self.inbox_changed.set()
        if outcome.dead_lettered:
            self.outbox_changed.set()
        return outcome

    async def last_readings(self, topics: Sequence[str]) -> dict[str, str]:
        """The id of the last reading (or dead letter) ingest took on each topic that has one."""
        return await self._call(storesql.last_readings, list(topics))

    async def took_readings(self) -> bool:
        """Whether ingest ever took a reading into this store (so a session existed before)."""
        return await self._call(storesql.took_readings)

    async def lease(self, exclude: Sequence[str] = ()) -> Reading | None:
        """The next reading to infer (highest priority, then oldest), marked as leased; none
        of the routes in `exclude`."""
        return await self._call(storesql.lease, exclude)

    async def release(self, reading_id: str, *, refund: bool = False) -> None:
        """Give a leased reading back to the inbox after a transient failure. `refund` takes
        back the attempt its lease counted: the failure was not the reading's fault."""
        await self._call(storesql.release, reading_id, refund)
        self.inbox_changed.set()

    async def complete(self, reading_id: str, row: NewOutboxRow) -> None:
        """In one transaction: add the result to the outbox and retire the reading."""
        await self._call(storesql.complete, reading_id, row, self.bounds)
        self.outbox_changed.set()

    async def lease_window(self, windows: dict[str, tuple[int, int]],
                           exclude: Sequence[str] = ()) -> list[Reading]:
        """Lease the next reading (highest priority, then oldest) and, in the same transaction,
        more of its route's readings in the same order: `windows[route] = (max, cap)` leases up
        to `max`, or up to `cap` while the route's unleased backlog exceeds `max` (coalescing).
        A route not in `windows` gets a window of one; the routes in `exclude` none. Empty
        when the inbox has nothing free."""
        return await self._call(storesql.lease_window, windows, exclude)

    async def lease_route(self, route: str, limit: int) -> list[Reading]:
        """Lease up to `limit` more readings of one route (to fill a window that waits)."""
        return await self._call(storesql.lease_route, route, limit)

    async def release_many(self, reading_ids: Sequence[str], *, refund: bool = False) -> None:
        """Give leased readings back to the inbox in one transaction (a failed window);
        `refund` as for `release`."""
        await self._call(storesql.release_many, list(reading_ids), refund)
        self.inbox_changed.set()

    async def complete_window(self, reading_ids: Sequence[str], row: NewOutboxRow) -> None:
        """In one transaction: add a window's result to the outbox and retire every reading
        it covers."""
        await self._call(storesql.complete_window, list(reading_ids), row, self.bounds)
        self.outbox_changed.set()

    async def dead_letter_reading(self, letter: DeadLetter, report: NewOutboxRow) -> None:
        """In one transaction: retire a leased reading into the dead-letter table and report it."""
        await self._call(storesql.dead_letter_reading, letter, report, self.bounds)
        self.outbox_changed.set()

    async def enqueue(self, row: NewOutboxRow) -> None:
        """Add one record to the outbox on its own (a model-update report, for example)."""
        await self._call(storesql.enqueue, row)
        self.outbox_changed.set()

    async def pending_outbox(self, limit: int, after_seq: int = 0) -> list[OutboxRow]:
        """Undelivered rows in delivery order (priority first, then oldest)."""
        return await self._call(storesql.pending_outbox, limit, after_seq)

    async def mark_delivered(self, seqs: Sequence[int]) -> None:
        """Retire rows whose PUBACK arrived; counted in `counters.delivered`."""
        await self._call(storesql.mark_delivered, list(seqs))

    async def depths(self) -> dict[str, int]:
        return await self._call(storesql.depths)

    async def stats(self) -> QueueStats:
        """Depths, bytes and the age of the oldest undelivered row, in one read."""
        return await self._call(storesql.stats)

    @property
    def is_open(self) -> bool:
        """The writer thread runs and the connection opened (readiness, not a health check)."""
        return self._thread.is_alive() and self._conn is not None
    async def report_drops(
        self, make_row: Callable[[int, dict[str, int], dict[str, int]], NewOutboxRow]
    ) -> NewOutboxRow | None:
        """If rows were dropped since the last report, add one report row to the outbox, in the
        same transaction that marks those drops reported. `make_row(report_number, dropped,
        dropped_total)` builds it (pure, runs on the writer thread)."""
        row = await self._call(storesql.report_drops, make_row)
        if row is not None:
            self.outbox_changed.set()
        return row

    async def expire(self, ttls: dict[str, float]) -> dict[str, int]:
        """Drop results older than their route's TTL (seconds of monotonic time, carried
        across restarts and reboots); each is counted as a drop of `<route>/ttl`."""
        return await self._call(storesql.expire, ttls)

    async def integrity_check(self) -> list[str]:
        """`PRAGMA integrity_check`: ["ok"] for a sound database."""
        return await self._call(storesql.integrity_check)


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)

