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

from agent.errors import StoreFull
from agent.records import DeadLetter, NewOutboxRow, OutboxRow, Reading

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
"""


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """What one ingest batch did: new readings, duplicates ignored, dead letters recorded."""

    accepted: int
    duplicates: int
    dead_lettered: int


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA busy_timeout=5000")
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
            self._conn.execute("COMMIT")
        else:
            self._conn.execute("ROLLBACK")


class Store:
    """Async facade over the writer thread. Open with `await Store.open(path)`, then `close()`."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self._loop = loop
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...],
                                            asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._conn: sqlite3.Connection | None = None
        # Set on the loop after a transaction adds rows; the pipeline and uplink wait on these.
        self.inbox_changed = asyncio.Event()
        self.outbox_changed = asyncio.Event()

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        store = cls(path, asyncio.get_running_loop())
        store._thread.start()
        await store._call(_open_schema)
        return store

    async def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    # -- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._conn = _connect(self.path)
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
        outcome = await self._call(_ingest, readings, dead)
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
        await self._call(_complete, reading_id, row)
        self.outbox_changed.set()

    async def dead_letter_reading(self, letter: DeadLetter, report: NewOutboxRow) -> None:
        """In one transaction: retire a leased reading into the dead-letter table and report it."""
        await self._call(_dead_letter_reading, letter, report)
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


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _open_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)
    # Leases belong to the process that took them; after a restart every reading is free again.
    conn.execute("UPDATE inbox SET leased = 0 WHERE leased = 1")


def _ingest(
    conn: sqlite3.Connection,
    readings: Sequence[Reading],
    dead: Sequence[tuple[DeadLetter, NewOutboxRow]],
) -> IngestOutcome:
    accepted = 0
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
        dead_lettered = sum(_insert_dead_letter(conn, d, report) for d, report in dead)
    return IngestOutcome(accepted, len(readings) - accepted, dead_lettered)


def _insert_dead_letter(conn: sqlite3.Connection, d: DeadLetter, report: NewOutboxRow) -> int:
    cursor = conn.execute(
        "INSERT INTO dead_letter (id, topic, payload, reason, received_at, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        (d.id, d.topic, d.payload, d.reason, d.received_at, time.time()),
    )
    if cursor.rowcount:
        _insert_outbox(conn, report)
    return cursor.rowcount


def _insert_outbox(conn: sqlite3.Connection, row: NewOutboxRow) -> None:
    conn.execute(
        "INSERT INTO outbox (id, kind, topic, payload, priority, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (kind, id) DO NOTHING",
        (row.id, row.kind, row.topic, row.payload, row.priority, time.time()),
    )


def _lease(conn: sqlite3.Connection) -> Reading | None:
    with _Transaction(conn):
        row = conn.execute(
            "UPDATE inbox SET leased = 1, attempts = attempts + 1 WHERE seq = "
            "(SELECT seq FROM inbox WHERE leased = 0 ORDER BY priority DESC, seq LIMIT 1) "
            "RETURNING id, topic, payload, received_at, route, priority, attempts"
        ).fetchone()
    if row is None:
        return None
    return Reading(row[0], row[1], bytes(row[2]), row[3], row[4], row[5], row[6])


def _release(conn: sqlite3.Connection, reading_id: str) -> None:
    with _Transaction(conn):
        conn.execute("UPDATE inbox SET leased = 0 WHERE id = ?", (reading_id,))


def _complete(conn: sqlite3.Connection, reading_id: str, row: NewOutboxRow) -> None:
    with _Transaction(conn):
        _insert_outbox(conn, row)
        conn.execute("DELETE FROM inbox WHERE id = ?", (reading_id,))


def _dead_letter_reading(conn: sqlite3.Connection, d: DeadLetter, report: NewOutboxRow) -> None:
    with _Transaction(conn):
        _insert_dead_letter(conn, d, report)
        conn.execute("DELETE FROM inbox WHERE id = ?", (d.id,))


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
        conn.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])
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
    return counts


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
