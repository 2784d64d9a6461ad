"""The SQLite store: inbox, outbox and dead letters, owned by one writer thread.

Owns the writer thread and the one read-write connection, which is created on that thread and
never leaves it; coroutines submit functions to the thread and get the answer back through
`loop.call_soon_threadsafe`, so nothing blocks the loop. Every hand-off between the agent's
stages goes through here, each as one transaction, so a crash at any point loses nothing that a
peer was told is safe. WAL with synchronous=FULL: a commit that returned survives power loss.
Speed comes from batching many rows per transaction, not from weaker sync. A SQLite error
raised on the thread is translated here, once, before it reaches the awaiting coroutine.

The store is five modules, the only agent modules that import sqlite3 or sqlite-utils: this
one (the thread and the async facade), agent/store/schema.py (connection, schema, the carried
clock), agent/store/transactions.py (the transactions the thread runs), agent/store/quarantine.py (a
corrupt file moved aside at open) and agent/store/views.py (read-only connections for the
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
from typing import Any, Literal, TypeVar

import structlog

from agent.base.errors import StoreDamaged, StoreFull, StoreUnavailable
from agent.base.records import DeadLetter, NewOutboxRow, OutboxRow, QueueStats, Reading
from agent.config.settings import StoreSection
from agent.store import transactions
from agent.store.quarantine import Quarantined, quarantine_if_corrupt
from agent.store.reserve import DrainReserve, free_bytes
from agent.store.schema import connect, open_schema
from agent.store.transactions import IngestOutcome

log = structlog.get_logger()

T = TypeVar("T")

# What a job may spend. "drain": a write that empties the store or must happen for it to empty
# (a lease, a release, a delete after PUBACK, an expiry, the open): all of the drain reserve.
# "write": any other write (a result, a dead letter, an update report): half of it. "input":
# ingest, held back from it. "read": no write.
_Use = Literal["drain", "input", "write", "read"]


# Primary result codes (the low byte of an extended code such as SQLITE_IOERR_WRITE).
_FULL = (sqlite3.SQLITE_FULL,)
_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_IO = (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL)


def _code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def _translate(exc: sqlite3.Error) -> Exception:
    """Classify a SQLite error once, by its result code (never by its text): a full disk or
    database is StoreFull (input waits), a lock or an I/O error is transient, a damaged file
    is permanent (agent/store/quarantine.py moves it aside at the next open)."""
    code, name = _code(exc), getattr(exc, "sqlite_errorname", type(exc).__name__)
    if code in _FULL:
        return StoreFull(f"store is full: {name}: {exc}")
    if code in _BUSY or code in _IO:
        return StoreUnavailable(f"store write failed: {name}: {exc}")
    if code in _DAMAGED:
        return StoreDamaged(f"store file is damaged: {name}: {exc}")
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
                                            asyncio.Future[Any], _Use] | None] = queue.SimpleQueue()
        self._reserve = DrainReserve(path, self.bounds.drain_reserve_bytes)
        # Whether completions keep their answered readings in the history: off while the
        # store's room is under the history's floor (see _yield_history), writer thread only.
        self._keep_history = self.bounds.history_max_rows > 0
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._conn: sqlite3.Connection | None = None
        # Set on the loop after a transaction adds rows; the pipeline and uplink wait on these.
        self.inbox_changed = asyncio.Event()
        self.outbox_changed = asyncio.Event()
        # Set on the loop after rows left the store (delivered, expired): paused input waits
        # on it before asking again whether there is room.
        self.space_freed = asyncio.Event()

    @classmethod
    async def open(cls, path: Path, bounds: StoreSection | None = None) -> Store:
        """Open (or create) the store. A database that fails `quick_check` is moved aside to
        `<dir>/quarantine/<time>/` with its -wal and -shm, and a fresh one is started."""
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        store = cls(path, asyncio.get_running_loop(), bounds)
        store._thread.start()
        try:
            await store._call(store._open, use="drain")
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
            self._conn = connect(self.path, self.bounds.max_page_count,
                                 self.bounds.drain_reserve_bytes // 4 or None)
        except sqlite3.Error as exc:
            opening_error: Exception | None = _translate(exc)
        else:
            opening_error = None
        while True:
            job = self._jobs.get()
            if job is None:
                break
            fn, args, future, use = job
            try:
                if self._conn is None:
                    raise opening_error or RuntimeError("store connection is closed")
                result = self._run_job(self._conn, fn, args, use)
            except sqlite3.Error as exc:
                self._loop.call_soon_threadsafe(_fail, future, _translate(exc))
            except Exception as exc:  # handed to the awaiting coroutine, which classifies it
                self._loop.call_soon_threadsafe(_fail, future, exc)
            else:
                self._loop.call_soon_threadsafe(_succeed, future, result)
        if self._conn is not None:
            self._conn.close()

    def _run_job(self, conn: sqlite3.Connection, fn: Callable[..., Any], args: tuple[Any, ...],
                 use: _Use) -> Any:
        """Run one job on the writer thread.

        Input and the other writes first retake the drain reserve if the store has room for
        it again (the drain's own jobs do not: they run to free room); input is held
        `drain_reserve_bytes` further from the edge while the reserve is spent. A write that
        finds the filesystem full folds the WAL into the database, truncates it and runs once
        more; if it is still full, the history of answered readings is deleted (nobody was
        promised it) and it runs again; then the reserve is spent (the file goes, the WAL is
        folded again) and it runs a last time. While the reserve is spent, results and other writes
        stop at half of it: the other half (twice the WAL's bound) stays for the drain's
        leases and deletes, so a store whose inbox filled the disk can still turn readings
        into results, and those can still be delivered and deleted."""
        if use == "input":
            self._retake_reserve(conn, self.bounds.reserve_bytes // 2)
            held_back = 0 if self._reserve.held else self._reserve.size
            self._yield_history(conn, held_back)
            try:
                return fn(conn, *args, held_back)
            except sqlite3.Error as exc:
                # Full before the floor saw it (reserve_bytes 0, or one large batch): the
                # history goes before any input is refused.
                if _code(exc) not in _FULL or not self._drop_all_history(conn, fn, exc):
                    raise
            return fn(conn, *args, held_back)
        if use == "write" and not self._reserve.held and self._reserve.size:
            # Taken again here too, not only before input: with input paused and nothing left
            # to deliver, no input job would come to take it, and every write would wait.
            self._retake_reserve(conn, self.bounds.reserve_bytes // 2)
            if not self._reserve.held:
                self._keep_for_the_drain(conn)
        try:
            return fn(conn, *args)
        except sqlite3.Error as exc:
            if use == "read" or _code(exc) not in _FULL:
                raise
        transactions.checkpoint(conn)
        try:
            return fn(conn, *args)
        except sqlite3.Error as exc:
            if _code(exc) not in _FULL:
                raise
            full = exc
        # The history goes before the drain reserve: it holds nothing anyone was promised.
        if self._drop_all_history(conn, fn, full):
            try:
                return fn(conn, *args)
            except sqlite3.Error as exc:
                if _code(exc) not in _FULL:
                    raise
                full = exc
        if not self._reserve.release():
            raise full
        error = f"{getattr(full, 'sqlite_errorname', '')}: {full}"
        folded = transactions.checkpoint(conn)
        log.warning("store_reserve_released", released_bytes=self._reserve.size,
                    wal_truncated=folded, free_bytes=free_bytes(self.path.parent),
                    job=getattr(fn, "__name__", "?"), error=error)
        return fn(conn, *args)

    def _drop_all_history(self, conn: sqlite3.Connection, fn: Callable[..., Any],
                          full: sqlite3.Error) -> bool:
        """Delete the whole history for a write the full store refused; False if there was
        none (or even its delete could not be written)."""
        dropped = transactions.drop_history(conn, everything=True)
        if not dropped:
            return False
        self._keep_history = False
        transactions.checkpoint(conn)
        log.warning("store_history_dropped", rows=dropped, everything=True,
                    job=getattr(fn, "__name__", "?"),
                    error=f"{getattr(full, 'sqlite_errorname', '')}: {full}")
        return True

    def _yield_history(self, conn: sqlite3.Connection, held_back: int) -> None:
        """Before each input job: the history may use the store's room only above its floor,
        twice the input reserve (plus what input is held back by). Under it, the older half of
        the history is deleted (its pages become room) at each input job until the store is
        back above the floor or the history is empty, and completions keep no history
        meanwhile: the history yields long before input is refused (under one reserve) or the
        drain reserve is spent."""
        if self.bounds.history_max_rows == 0:
            return
        floor = 2 * self.bounds.reserve_bytes + held_back
        room = transactions.room_bytes(conn)
        if room < floor and transactions.has_history(conn):
            if transactions.checkpoint(conn):  # the WAL's file is room too
                room = transactions.room_bytes(conn)
            if room < floor:
                dropped = transactions.drop_history(conn, everything=False)
                room = transactions.room_bytes(conn)
                if dropped:
                    log.warning("store_history_dropped", rows=dropped, everything=False,
                                room_bytes=room, floor_bytes=floor)
        self._keep_history = room >= floor

    def _history_wanted(self) -> bool:
        """Whether a completion now keeps its answered reading: not while the store's room is
        under the history's floor, nor while the drain reserve is spent."""
        return self._keep_history and (self._reserve.held or self._reserve.size == 0)

    def _keep_for_the_drain(self, conn: sqlite3.Connection) -> None:
        """While the reserve is spent, a write other than the drain's goes ahead only with half
        of it left as room, and a quarter of it (the WAL's bound) free on the filesystem, where
        the deletes' WAL frames must go: free pages inside the database do not take them, so
        they are given back to the filesystem first where the store allows it."""
        floor, wal = self._reserve.size // 2, self._reserve.size // 4
        free = free_bytes(self.path.parent)
        if free < wal and transactions.checkpoint(conn):
            free = free_bytes(self.path.parent)
        if free < wal and transactions.free_page_bytes(conn) >= floor:
            transactions.give_back(conn, wal - free)
            free = free_bytes(self.path.parent)
        room = transactions.room_bytes(conn)
        if free < wal or room < floor:
            raise StoreFull(f"store is full: {room} bytes of room, {free} free on the "
                            f"filesystem, while the drain reserve is spent ({floor} bytes of "
                            f"room and {wal} free kept for deliveries); waiting for them")

    def _retake_reserve(self, conn: sqlite3.Connection, margin: int) -> None:
        """Take the drain reserve again once the store has room for it beside the input's own
        reserve (the room input is held back by while it is spent, so taking it does not
        push the store under its threshold). Free pages a drain left inside the database are
        given back to the filesystem for it first."""
        if self._reserve.held or self._reserve.size == 0:
            return
        # Once input runs, with half an input reserve to spare (as paused input resumes):
        # taking the file must not pause input again at once.
        needed = self._reserve.size + self.bounds.reserve_bytes + margin
        free = free_bytes(self.path.parent)
        if free < needed:
            if free + transactions.free_page_bytes(conn) < needed:
                return
            if not transactions.give_back(conn, needed - free):
                return
            if free_bytes(self.path.parent) < needed:
                return
        if self._reserve.take():
            log.info("store_reserve_taken", bytes=self._reserve.size,
                     free_bytes=free_bytes(self.path.parent))

    def _open(self, conn: sqlite3.Connection) -> None:
        """At open: the schema (a drain job: after a crash on a full disk it must still free
        the leases), then the drain reserve: taken if the filesystem has room for it, spent at
        once if the filesystem is full (less free than the WAL's bound), because the start
        itself must write (the OTA state's start count, the leases freed, the first lease)."""
        open_schema(conn)
        pruned = transactions.prune_history(conn, self.bounds.history_max_rows)
        if pruned:
            log.info("store_history_pruned", rows=pruned,
                     history_max_rows=self.bounds.history_max_rows)
        if not self._reserve.adopt() and not self._reserve.spent:
            self._retake_reserve(conn, 0)
        elif free_bytes(self.path.parent) < self._reserve.size // 4:
            self._reserve.release()
            log.warning("store_reserve_released", released_bytes=self._reserve.size,
                        free_bytes=free_bytes(self.path.parent), job="open",
                        error="the filesystem is full at start")
        if not self._reserve.held and self._reserve.size:
            log.warning("store_reserve_unavailable", bytes=self._reserve.size,
                        free_bytes=free_bytes(self.path.parent), path=str(self._reserve.path))

    async def _call(self, fn: Callable[..., T], *args: Any, use: _Use = "read") -> T:
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((fn, args, future, use))
        return await future

    # -- the operations -----------------------------------------------------------------------

    async def ingest(
        self, readings: Sequence[Reading], dead: Sequence[tuple[DeadLetter, NewOutboxRow]]
    ) -> IngestOutcome:
        """Commit readings and dead letters in one transaction; after it, acking is safe."""
        outcome = await self._call(transactions.ingest, readings, dead, self.bounds, use="input")
        if outcome.accepted:
            self.inbox_changed.set()
        if outcome.dead_lettered:
            self.outbox_changed.set()
        return outcome

    async def last_readings(self, topics: Sequence[str]) -> dict[str, str]:
        """The id of the last reading (or dead letter) ingest took on each topic that has one."""
        return await self._call(transactions.last_readings, list(topics))

    async def took_readings(self) -> bool:
        """Whether ingest ever took a reading into this store (so a session existed before)."""
        return await self._call(transactions.took_readings)

    async def input_refusal(self) -> StoreFull | None:
        """Why paused ingest should not resume yet (the store full, the outbox at its bound),
        or None. It resumes with half an input reserve more room than a batch needs, so that
        the window the local broker redelivers fits rather than pausing it again at once."""
        return await self._call(self._resume_refusal, use="input")

    def _resume_refusal(self, conn: sqlite3.Connection, held_back: int) -> StoreFull | None:
        return transactions.input_refusal(conn, self.bounds,
                                      held_back + self.bounds.reserve_bytes // 2)

    async def lease(self, exclude: Sequence[str] = ()) -> Reading | None:
        """The next reading to infer (highest priority, then oldest), marked as leased; none
        of the routes in `exclude`."""
        return await self._call(transactions.lease, exclude, use="drain")

    async def release(self, reading_id: str, *, refund: bool = False) -> None:
        """Give a leased reading back to the inbox after a transient failure. `refund` takes
        back the attempt its lease counted: the failure was not the reading's fault."""
        await self._call(transactions.release, reading_id, refund, use="drain")
        self.inbox_changed.set()

    async def complete(self, reading_id: str, row: NewOutboxRow) -> None:
        """In one transaction: add the result to the outbox, retire the reading and (an ok
        result) keep the answered reading in the history."""
        await self._call(self._complete, reading_id, row, use="write")
        self.outbox_changed.set()

    def _complete(self, conn: sqlite3.Connection, reading_id: str, row: NewOutboxRow) -> None:
        transactions.complete(conn, reading_id, row, self.bounds, self._history_wanted())

    async def lease_window(self, windows: dict[str, tuple[int, int]],
                           exclude: Sequence[str] = ()) -> list[Reading]:
        """Lease the next reading (highest priority, then oldest) and, in the same transaction,
        more of its route's readings in the same order: `windows[route] = (max, cap)` leases up
        to `max`, or up to `cap` while the route's unleased backlog exceeds `max` (coalescing).
        A route not in `windows` gets a window of one; the routes in `exclude` none. Empty
        when the inbox has nothing free."""
        return await self._call(transactions.lease_window, windows, exclude, use="drain")

    async def lease_route(self, route: str, limit: int) -> list[Reading]:
        """Lease up to `limit` more readings of one route (to fill a window that waits)."""
        return await self._call(transactions.lease_route, route, limit, use="drain")

    async def release_many(self, reading_ids: Sequence[str], *, refund: bool = False) -> None:
        """Give leased readings back to the inbox in one transaction (a failed window);
        `refund` as for `release`."""
        await self._call(transactions.release_many, list(reading_ids), refund, use="drain")
        self.inbox_changed.set()

    async def complete_window(self, reading_ids: Sequence[str], row: NewOutboxRow) -> None:
        """In one transaction: add a window's result to the outbox and retire every reading
        it covers."""
        await self._call(transactions.complete_window, list(reading_ids), row, self.bounds,
                         use="write")
        self.outbox_changed.set()

    async def dead_letter_reading(self, letter: DeadLetter, report: NewOutboxRow) -> None:
        """In one transaction: retire a leased reading into the dead-letter table and report it."""
        await self._call(transactions.dead_letter_reading, letter, report, self.bounds,
                         use="write")
        self.outbox_changed.set()

    async def enqueue(self, row: NewOutboxRow) -> None:
        """Add one record to the outbox on its own (a model-update report, for example)."""
        await self._call(transactions.enqueue, row, use="write")
        self.outbox_changed.set()

    async def pending_outbox(self, limit: int, after_seq: int = 0) -> list[OutboxRow]:
        """Up to `limit` undelivered rows after `after_seq`, in seq order (oldest first, whatever
        their priority)."""
        return await self._call(transactions.pending_outbox, limit, after_seq, use="read")

    async def mark_delivered(self, seqs: Sequence[int]) -> None:
        """Retire rows whose PUBACK arrived; counted in `counters.delivered`."""
        await self._call(transactions.mark_delivered, list(seqs), use="drain")
        self.space_freed.set()

    async def depths(self) -> dict[str, int]:
        return await self._call(transactions.depths, use="read")

    async def stats(self) -> QueueStats:
        """Depths, bytes and the age of the oldest undelivered row, in one read."""
        return await self._call(transactions.stats, use="read")

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
        row = await self._call(transactions.report_drops, make_row, use="drain")
        if row is not None:
            self.outbox_changed.set()
        return row

    async def expire(self, ttls: dict[str, float]) -> dict[str, int]:
        """Drop results older than their route's TTL (seconds of monotonic time, carried
        across restarts and reboots); each is counted as a drop of `<route>/ttl`."""
        expired = await self._call(transactions.expire, ttls, use="drain")
        if expired:
            self.space_freed.set()
        return expired

    async def integrity_check(self) -> list[str]:
        """`PRAGMA integrity_check`: ["ok"] for a sound database."""
        return await self._call(transactions.integrity_check, use="read")


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)

