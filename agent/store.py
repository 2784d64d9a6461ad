"""The SQLite store: inbox, outbox and dead letters, owned by one writer thread.

The only module that imports sqlite3 and sqlite-utils. Every hand-off between the agent's stages
goes through here, each as one transaction, so a crash at any point loses nothing that a peer was
told is safe. WAL with synchronous=FULL: a commit that returned survives power loss. Speed comes
from batching many rows per transaction, not from weaker sync.

The connection is created on the writer thread and never leaves it; coroutines submit work to the
thread and get the answer back through `loop.call_soon_threadsafe`, so nothing blocks the loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils
import structlog

from agent.config import StoreSection
from agent.errors import OutboxFull, StoreFull, StoreUnreadable
from agent.records import DeadLetter, NewOutboxRow, OutboxRow, QueueStats, Reading

log = structlog.get_logger()

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    route TEXT NOT NULL,
    priority INTEGER NOT NULL,
    received_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    leased INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS inbox_next ON inbox (leased, priority DESC, seq);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    priority INTEGER NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (kind, id)
);
CREATE TABLE IF NOT EXISTS dead_letter (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    received_at REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS drops (
    route TEXT PRIMARY KEY,
    dropped INTEGER NOT NULL DEFAULT 0,
    reported INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS clock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    boot_id TEXT NOT NULL,
    last_mono REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sizes (
    name TEXT PRIMARY KEY,
    rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
"""

# Kept by triggers so the bound check costs O(1) per batch; recounted at every open.
SIZE_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS {table}_added AFTER INSERT ON {table} BEGIN
    UPDATE sizes SET rows = rows + 1, bytes = bytes + length(NEW.payload)
    WHERE name = '{table}';
END;
CREATE TRIGGER IF NOT EXISTS {table}_removed AFTER DELETE ON {table} BEGIN
    UPDATE sizes SET rows = rows - 1, bytes = bytes - length(OLD.payload)
    WHERE name = '{table}';
END;
"""


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """What one ingest batch did: new readings, duplicates ignored, dead letters recorded."""

    accepted: int
    duplicates: int
    dead_lettered: int


def _connect(path: Path, max_page_count: int | None = None) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA busy_timeout=5000")
    if max_page_count is not None:
        db.execute(f"PRAGMA max_page_count={int(max_page_count)}")
    return conn


def _translate(exc: sqlite3.Error) -> Exception:
    text = str(exc).lower()
    if "full" in text:
        return StoreFull(f"store is full: {exc}")
    return exc


class _Transaction:
    """`with _Transaction(conn):` is BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()
                raise
        else:
            self._rollback()

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR); a ROLLBACK
        # then would raise "no transaction is active" and hide the error that matters.
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")


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
            await store._call(_open_schema)
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
            self.quarantined = _quarantine_if_corrupt(self.path)
            self._conn = _connect(self.path, self.bounds.max_page_count)
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
        outcome = await self._call(_ingest, readings, dead, self.bounds)
        if outcome.accepted:
            self.inbox_changed.set()
        if outcome.dead_lettered:
            self.outbox_changed.set()
        return outcome

    async def lease(self) -> Reading | None:
        """The next reading to infer (highest priority, then oldest), marked as leased."""
        return await self._call(_lease)

    async def release(self, reading_id: str) -> None:
        """Give a leased reading back to the inbox after a transient failure."""
        await self._call(_release, reading_id)
        self.inbox_changed.set()

    async def complete(self, reading_id: str, row: NewOutboxRow) -> None:
        """In one transaction: add the result to the outbox and retire the reading."""
        await self._call(_complete, reading_id, row, self.bounds)
        self.outbox_changed.set()

    async def lease_window(self, windows: dict[str, tuple[int, int]]) -> list[Reading]:
        """Lease the next reading (highest priority, then oldest) and, in the same transaction,
        more of its route's readings in the same order: `windows[route] = (max, cap)` leases up
        to `max`, or up to `cap` while the route's unleased backlog exceeds `max` (coalescing).
        A route not in `windows` gets a window of one. Empty when the inbox has nothing free."""
        return await self._call(_lease_window, windows)

    async def lease_route(self, route: str, limit: int) -> list[Reading]:
        """Lease up to `limit` more readings of one route (to fill a window that waits)."""
        return await self._call(_lease_route, route, limit)

    async def release_many(self, reading_ids: Sequence[str]) -> None:
        """Give leased readings back to the inbox in one transaction (a failed window)."""
        await self._call(_release_many, list(reading_ids))
        self.inbox_changed.set()

    async def complete_window(self, reading_ids: Sequence[str], row: NewOutboxRow) -> None:
        """In one transaction: add a window's result to the outbox and retire every reading
        it covers."""
        await self._call(_complete_window, list(reading_ids), row, self.bounds)
        self.outbox_changed.set()

    async def dead_letter_reading(self, letter: DeadLetter, report: NewOutboxRow) -> None:
        """In one transaction: retire a leased reading into the dead-letter table and report it."""
        await self._call(_dead_letter_reading, letter, report, self.bounds)
        self.outbox_changed.set()

    async def enqueue(self, row: NewOutboxRow) -> None:
        """Add one record to the outbox on its own (a model-update report, for example)."""
        await self._call(_enqueue, row)
        self.outbox_changed.set()

    async def pending_outbox(self, limit: int, after_seq: int = 0) -> list[OutboxRow]:
        """Undelivered rows in delivery order (priority first, then oldest)."""
        return await self._call(_pending_outbox, limit, after_seq)

    async def mark_delivered(self, seqs: Sequence[int]) -> None:
        """Retire rows whose PUBACK arrived; counted in `counters.delivered`."""
        await self._call(_mark_delivered, list(seqs))

    async def depths(self) -> dict[str, int]:
        return await self._call(_depths)

    async def stats(self) -> QueueStats:
        """Depths, bytes and the age of the oldest undelivered row, in one read."""
        return await self._call(_stats)

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
        row = await self._call(_report_drops, make_row)
        if row is not None:
            self.outbox_changed.set()
        return row

    async def expire(self, ttls: dict[str, float]) -> dict[str, int]:
        """Drop results older than their route's TTL (seconds of monotonic time, carried
        across restarts and reboots); each is counted as a drop of `<route>/ttl`."""
        return await self._call(_expire, ttls)

    async def integrity_check(self) -> list[str]:
        """`PRAGMA integrity_check`: ["ok"] for a sound database."""
        return await self._call(_integrity_check)


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _open_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA + "".join(SIZE_TRIGGERS.format(table=t) for t in ("inbox", "outbox")))
    with _Transaction(conn):
        columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
        if "route" not in columns:  # a store made before drops were counted per route
            conn.execute("ALTER TABLE outbox ADD COLUMN route TEXT NOT NULL DEFAULT ''")
        conn.execute("CREATE INDEX IF NOT EXISTS outbox_victims ON outbox (priority, seq)")
        for table in ("inbox", "outbox"):
            conn.execute(
                f"INSERT OR REPLACE INTO sizes (name, rows, bytes) "
                f"SELECT '{table}', count(*), coalesce(sum(length(payload)), 0) FROM {table}"
            )
        if "created_mono" not in columns:  # a store made before per-route TTLs
            conn.execute("ALTER TABLE outbox ADD COLUMN created_mono REAL NOT NULL DEFAULT 0")
        _carry_ages_across_boots(conn)
        # Leases belong to the process that took them; after a restart every reading is free.
        conn.execute("UPDATE inbox SET leased = 0 WHERE leased = 1")


def _monotonic() -> float:
    """The clock of outbox ages (a seam for the reboot test)."""
    return time.monotonic()


def _boot_id() -> str:
    """This boot's id from the kernel, or "" where there is none (then a monotonic clock that
    went backwards is the sign of a reboot)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _carry_ages_across_boots(conn: sqlite3.Connection) -> None:
    """Keep outbox ages in monotonic time across reboots.

    A row's age is `time.monotonic() - created_mono`: immune to wall-clock jumps, but the
    monotonic clock restarts at every boot. The store remembers the boot id and the last
    monotonic time it saw; after a reboot every row's `created_mono` is shifted back by that
    last time, so its age carries on from where it was. Time the gateway was off (or suspended)
    does not count: a TTL here means time the gateway spent running, never an early expiry
    from a clock that jumped.
    """
    boot, now = _boot_id(), _monotonic()
    row = conn.execute("SELECT boot_id, last_mono FROM clock WHERE id = 1").fetchone()
    if row is not None:
        last_boot, last_mono = str(row[0]), float(row[1])
        rebooted = boot != last_boot if boot and last_boot else now < last_mono
        if rebooted:
            conn.execute("UPDATE outbox SET created_mono = created_mono - ?", (last_mono,))
    _touch_clock(conn, boot, now)


def _touch_clock(conn: sqlite3.Connection, boot: str, now: float) -> None:
    conn.execute("INSERT INTO clock (id, boot_id, last_mono) VALUES (1, ?, ?) ON CONFLICT (id) "
                 "DO UPDATE SET boot_id = excluded.boot_id, last_mono = excluded.last_mono",
                 (boot, now))


def _expire(conn: sqlite3.Connection, ttls: dict[str, float]) -> dict[str, int]:
    """Delete result rows older than their route's TTL; count them as drops of `<route>/ttl`."""
    now = _monotonic()
    expired: dict[str, int] = {}
    with _Transaction(conn):
        _touch_clock(conn, _boot_id(), now)
        for route, ttl_s in ttls.items():
            gone = conn.execute(
                "DELETE FROM outbox WHERE kind = 'result' AND route = ? AND created_mono < ?",
                (route, now - ttl_s),
            ).rowcount
            if gone:
                expired[f"{route}/ttl"] = gone
        conn.executemany(
            "INSERT INTO drops (route, dropped) VALUES (?, ?) "
            "ON CONFLICT (route) DO UPDATE SET dropped = dropped + excluded.dropped",
            list(expired.items()),
        )
    return expired


def _sizes(conn: sqlite3.Connection) -> tuple[int, int]:
    """Rows and payload bytes waiting in the inbox and the outbox together."""
    rows, size = conn.execute("SELECT sum(rows), sum(bytes) FROM sizes").fetchone()
    return int(rows or 0), int(size or 0)


def _room_bytes(conn: sqlite3.Connection) -> int:
    """Bytes the database can still grow by: free pages inside the file plus free filesystem
    space, capped by PRAGMA max_page_count."""
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    free_pages = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    max_pages = int(conn.execute("PRAGMA max_page_count").fetchone()[0])
    database = conn.execute("PRAGMA database_list").fetchone()[2]
    fs = os.statvfs(os.path.dirname(database) or ".")
    room = fs.f_bavail * fs.f_frsize + free_pages * page_size
    return int(min(room, (max_pages - pages + free_pages) * page_size))


def _ingest(
    conn: sqlite3.Connection,
    readings: Sequence[Reading],
    dead: Sequence[tuple[DeadLetter, NewOutboxRow]],
    bounds: StoreSection,
) -> IngestOutcome:
    accepted = 0
    room = _room_bytes(conn)
    if room < bounds.reserve_bytes:
        # A store filled to the last page by readings could not turn them into results (a
        # result is larger than its reading): the deadlock this reserve prevents.
        raise StoreFull(f"store is full: {room} bytes left, below the reserve of "
                        f"{bounds.reserve_bytes} bytes; refusing input")
    if bounds.when_full == "refuse_input":
        rows, size = _sizes(conn)
        if rows >= bounds.max_outbox_rows or size >= bounds.max_outbox_bytes:
            raise OutboxFull(f"outbox at its bound ({rows} rows, {size} bytes waiting; "
                             f"max {bounds.max_outbox_rows} rows, {bounds.max_outbox_bytes} "
                             "bytes); refusing input")
    with _Transaction(conn):
        for r in readings:
            # A redelivered reading whose result is already waiting in the outbox is not redone.
            cursor = conn.execute(
                "INSERT INTO inbox (id, topic, payload, route, priority, received_at) "
                "SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS "
                "(SELECT 1 FROM outbox WHERE kind = 'result' AND id = ?) "
                "ON CONFLICT (id) DO NOTHING",
                (r.id, r.topic, r.payload, r.route, r.priority, r.received_at, r.id),
            )
            accepted += cursor.rowcount
        dead_lettered = sum(_insert_dead_letter(conn, d, report, bounds) for d, report in dead)
    return IngestOutcome(accepted, len(readings) - accepted, dead_lettered)


def _insert_dead_letter(conn: sqlite3.Connection, d: DeadLetter, report: NewOutboxRow,
                        bounds: StoreSection) -> int:
    cursor = conn.execute(
        "INSERT INTO dead_letter (id, topic, payload, reason, received_at, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        (d.id, d.topic, d.payload, d.reason, d.received_at, time.time()),
    )
    if cursor.rowcount:
        _insert_outbox(conn, report, bounds)
    return cursor.rowcount


def _insert_outbox(conn: sqlite3.Connection, row: NewOutboxRow,
                   bounds: StoreSection | None = None) -> None:
    conn.execute(
        "INSERT INTO outbox (id, kind, topic, payload, priority, created_at, route, "
        "created_mono) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, id) DO NOTHING",
        (row.id, row.kind, row.topic, row.payload, row.priority, time.time(), row.route,
         _monotonic()),
    )
    if bounds is not None and bounds.when_full == "drop_oldest":
        _drop_over_bound(conn, bounds)


def _drop_over_bound(conn: sqlite3.Connection, bounds: StoreSection) -> None:
    """Delete the lowest-priority, oldest rows until the outbox is within its bound, counting
    each per route. Drop reports (kind "drops") are never dropped. Runs inside the caller's
    transaction, so a row is dropped exactly when the row that displaced it is committed."""
    while True:
        rows, size = conn.execute(
            "SELECT rows, bytes FROM sizes WHERE name = 'outbox'"
        ).fetchone()
        if rows <= bounds.max_outbox_rows and size <= bounds.max_outbox_bytes:
            return
        victims = conn.execute(
            "SELECT seq, CASE route WHEN '' THEN kind ELSE route END, length(payload) "
            "FROM outbox WHERE kind != 'drops' ORDER BY priority, seq LIMIT 64"
        ).fetchall()
        if not victims:
            return
        counted: dict[str, int] = {}
        for seq, route, length in victims:
            if rows <= bounds.max_outbox_rows and size <= bounds.max_outbox_bytes:
                break
            conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            counted[route] = counted.get(route, 0) + 1
            rows, size = rows - 1, size - length
        conn.executemany(
            "INSERT INTO drops (route, dropped) VALUES (?, ?) "
            "ON CONFLICT (route) DO UPDATE SET dropped = dropped + excluded.dropped",
            list(counted.items()),
        )


def _lease(conn: sqlite3.Connection) -> Reading | None:
    # A lease is void after any restart and no peer is told anything when one is taken, so its
    # commit need not wait for an fsync: the next synchronous=FULL commit (the result's) syncs
    # the WAL up to and including it. A process crash loses nothing either way (the WAL is in
    # the OS cache); only a power cut may forget one attempt count.
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        with _Transaction(conn):
            row = conn.execute(
                "UPDATE inbox SET leased = 1, attempts = attempts + 1 WHERE seq = "
                "(SELECT seq FROM inbox WHERE leased = 0 ORDER BY priority DESC, seq LIMIT 1) "
                "RETURNING id, topic, payload, received_at, route, priority, attempts"
            ).fetchone()
    finally:
        conn.execute("PRAGMA synchronous=FULL")
    if row is None:
        return None
    return Reading(row[0], row[1], bytes(row[2]), row[3], row[4], row[5], row[6])


def _release(conn: sqlite3.Connection, reading_id: str) -> None:
    with _Transaction(conn):
        conn.execute("UPDATE inbox SET leased = 0 WHERE id = ?", (reading_id,))


def _complete(conn: sqlite3.Connection, reading_id: str, row: NewOutboxRow,
              bounds: StoreSection) -> None:
    with _Transaction(conn):
        # Retire the reading first: the outbox bound then sees its room in the same transaction.
        conn.execute("DELETE FROM inbox WHERE id = ?", (reading_id,))
        _insert_outbox(conn, row, bounds)


_LEASED_COLUMNS = "id, topic, payload, received_at, route, priority, attempts"


def _readings(rows: Sequence[Any]) -> list[Reading]:
    return [Reading(r[0], r[1], bytes(r[2]), r[3], r[4], r[5], r[6]) for r in rows]


def _lease_some(conn: sqlite3.Connection, route: str, limit: int) -> list[Reading]:
    # RETURNING gives rows in no promised order; the window's order is the lease order.
    rows = conn.execute(
        "UPDATE inbox SET leased = 1, attempts = attempts + 1 WHERE seq IN "
        "(SELECT seq FROM inbox WHERE leased = 0 AND route = ? ORDER BY priority DESC, seq "
        f"LIMIT ?) RETURNING seq, {_LEASED_COLUMNS}", (route, limit),
    ).fetchall()
    rows.sort(key=lambda r: (-r[6], r[0]))
    return _readings([r[1:] for r in rows])


def _lease_window(conn: sqlite3.Connection, windows: dict[str, tuple[int, int]]) -> list[Reading]:
    # Like _lease: a lease is void after a restart, so its commit need not wait for an fsync.
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        with _Transaction(conn):
            head = conn.execute(
                "SELECT route FROM inbox WHERE leased = 0 ORDER BY priority DESC, seq LIMIT 1"
            ).fetchone()
            if head is None:
                return []
            route = str(head[0])
            size, cap = windows.get(route, (1, 1))
            if cap > size:
                backlog = conn.execute(
                    "SELECT count(*) FROM inbox WHERE leased = 0 AND route = ?", (route,)
                ).fetchone()[0]
                size = max(size, min(cap, int(backlog)))
            return _lease_some(conn, route, size)
    finally:
        conn.execute("PRAGMA synchronous=FULL")


def _lease_route(conn: sqlite3.Connection, route: str, limit: int) -> list[Reading]:
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        with _Transaction(conn):
            return _lease_some(conn, route, limit)
    finally:
        conn.execute("PRAGMA synchronous=FULL")


def _release_many(conn: sqlite3.Connection, reading_ids: list[str]) -> None:
    with _Transaction(conn):
        conn.execute("UPDATE inbox SET leased = 0 WHERE id IN (SELECT value FROM json_each(?))",
                     (json.dumps(reading_ids),))


def _complete_window(conn: sqlite3.Connection, reading_ids: list[str], row: NewOutboxRow,
                     bounds: StoreSection) -> None:
    with _Transaction(conn):
        # Retire the readings first: the outbox bound then sees their room in this transaction.
        conn.execute("DELETE FROM inbox WHERE id IN (SELECT value FROM json_each(?))",
                     (json.dumps(reading_ids),))
        _insert_outbox(conn, row, bounds)


def _dead_letter_reading(conn: sqlite3.Connection, d: DeadLetter, report: NewOutboxRow,
                         bounds: StoreSection) -> None:
    with _Transaction(conn):
        conn.execute("DELETE FROM inbox WHERE id = ?", (d.id,))
        _insert_dead_letter(conn, d, report, bounds)


def _report_drops(
    conn: sqlite3.Connection,
    make_row: Callable[[int, dict[str, int], dict[str, int]], NewOutboxRow],
) -> NewOutboxRow | None:
    with _Transaction(conn):
        rows = conn.execute("SELECT route, dropped, reported FROM drops").fetchall()
        dropped = {route: total - reported for route, total, reported in rows
                   if total > reported}
        if not dropped:
            return None
        number = conn.execute(
            "INSERT INTO counters (name, value) VALUES ('drop_reports', 1) "
            "ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value"
        ).fetchone()[0]
        row = make_row(int(number), dropped, {route: total for route, total, _ in rows})
        _insert_outbox(conn, row)
        conn.execute("UPDATE drops SET reported = dropped")
    return row


def _integrity_check(conn: sqlite3.Connection) -> list[str]:
    return [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A database that failed `quick_check` at open and was moved aside."""

    directory: Path
    reason: str
    files: list[str]


def _quarantine_if_corrupt(path: Path) -> Quarantined | None:
    """Run `PRAGMA quick_check` on an existing database; if it is damaged, move it (and its
    -wal and -shm) to `<dir>/quarantine/<UTC time>/` durably, so a fresh store can start and
    the damaged one is kept for an operator. Errors other than corruption are raised."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    reason = _quick_check(path)
    if reason is None:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.parent / "quarantine" / f"{stamp}-{time.monotonic_ns() % 10**6:06d}"
    target.mkdir(parents=True)
    moved = []
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            os.replace(source, target / source.name)
            moved.append(source.name)
    for directory in (target, target.parent, path.parent):
        _fsync_dir(directory)
    return Quarantined(target, reason, moved)


def _quick_check(path: Path) -> str | None:
    """None if the database is sound, else why not."""
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            rows = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
        finally:
            conn.close()
    except sqlite3.OperationalError:
        raise  # locked, I/O error, disk full: not evidence of a damaged file
    except sqlite3.DatabaseError as exc:  # SQLITE_CORRUPT, SQLITE_NOTADB
        return f"{getattr(exc, 'sqlite_errorname', type(exc).__name__)}: {exc}"
    if rows == ["ok"]:
        return None
    return "quick_check: " + "; ".join(rows[:5])


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _enqueue(conn: sqlite3.Connection, row: NewOutboxRow) -> None:
    with _Transaction(conn):
        _insert_outbox(conn, row)


def _pending_outbox(conn: sqlite3.Connection, limit: int, after_seq: int) -> list[OutboxRow]:
    rows = conn.execute(
        "SELECT seq, id, topic, payload, kind FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
        (after_seq, limit),
    ).fetchall()
    return [OutboxRow(seq, id_, topic, bytes(payload), kind)
            for seq, id_, topic, payload, kind in rows]


def _mark_delivered(conn: sqlite3.Connection, seqs: list[int]) -> None:
    with _Transaction(conn):
        # One statement for the whole group: far cheaper than a DELETE per row.
        conn.execute("DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?))",
                     (json.dumps(seqs),))
        conn.execute(
            "INSERT INTO counters (name, value) VALUES ('delivered', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (len(seqs),),
        )


def _depths(conn: sqlite3.Connection) -> dict[str, int]:
    return snapshot_counts(sqlite_utils.Database(conn))


def snapshot_counts(db: sqlite_utils.Database) -> dict[str, int]:
    counts = {name: int(db[name].count) for name in ("inbox", "outbox", "dead_letter")}
    delivered = db.execute("SELECT value FROM counters WHERE name = 'delivered'").fetchone()
    counts["delivered"] = int(delivered[0]) if delivered else 0
    if db["drops"].exists():
        dropped = db.execute("SELECT coalesce(sum(dropped), 0) FROM drops").fetchone()
        counts["dropped"] = int(dropped[0])
    return counts


def read_drops(path: Path) -> dict[str, int]:
    """Rows dropped at the outbox bound, per route, read-only."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {str(r): int(n) for r, n in conn.execute("SELECT route, dropped FROM drops")}
    finally:
        conn.close()


def read_counts(path: Path) -> dict[str, int]:
    """Row counts read through a separate read-only connection: safe while the agent runs."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return snapshot_counts(sqlite_utils.Database(conn))
    finally:
        conn.close()


def read_dead_letters(path: Path, limit: int = 100) -> list[dict[str, Any]]:
    """The newest dead letters with their reasons, read-only."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db = sqlite_utils.Database(conn)
        return list(db["dead_letter"].rows_where(order_by="seq desc", limit=limit))
    finally:
        conn.close()


def _stats(conn: sqlite3.Connection) -> QueueStats:
    return queue_stats(conn, time.time())


def queue_stats(conn: sqlite3.Connection, now: float) -> QueueStats:
    inbox, inbox_bytes = conn.execute(
        "SELECT count(*), coalesce(sum(length(payload)), 0) FROM inbox").fetchone()
    outbox, outbox_bytes, oldest = conn.execute(
        "SELECT count(*), coalesce(sum(length(payload)), 0), min(created_at) FROM outbox"
    ).fetchone()
    dead = conn.execute("SELECT count(*) FROM dead_letter").fetchone()[0]
    delivered = conn.execute("SELECT value FROM counters WHERE name = 'delivered'").fetchone()
    return QueueStats(
        inbox=int(inbox), inbox_bytes=int(inbox_bytes), outbox=int(outbox),
        outbox_bytes=int(outbox_bytes), dead_letter=int(dead),
        delivered=int(delivered[0]) if delivered else 0,
        oldest_undelivered_s=None if oldest is None else max(0.0, now - float(oldest)),
    )


def _read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise StoreUnreadable(f"no store at {path}")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def read_stats(path: Path) -> QueueStats:
    """QueueStats through a separate read-only connection: safe while the agent runs."""
    conn = _read_only(path)
    try:
        return queue_stats(conn, time.time())
    except sqlite3.Error as exc:
        raise StoreUnreadable(f"{path}: {exc}") from exc
    finally:
        conn.close()


def read_oldest(path: Path, table: str, limit: int = 10) -> list[dict[str, Any]]:
    """The oldest rows of `inbox` or `outbox` (without payloads), read-only."""
    columns = {
        "inbox": "seq, id, topic, route, priority, received_at AS at, attempts, leased, "
                 "length(payload) AS payload_bytes",
        "outbox": "seq, id, kind, topic, priority, created_at AS at, "
                  "length(payload) AS payload_bytes",
    }[table]
    conn = _read_only(path)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(f"SELECT {columns} FROM {table} ORDER BY seq LIMIT ?", (limit,))
        return [dict(row) for row in rows]
    except sqlite3.Error as exc:
        raise StoreUnreadable(f"{path}: {exc}") from exc
    finally:
        conn.close()
