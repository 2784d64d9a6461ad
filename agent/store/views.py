"""Read-only views of the store for the operator's commands (`edge-agent status`, `queue`,
`queue export`).

Owns the `read_*` functions, each on a separate read-only connection (`mode=ro`) opened and
closed per call (`read_route`: per block, for `edge-agent queue export`), so they are safe
while the agent runs, and each translating any SQLite error into StoreUnreadable; and the
counting queries they share with the writer thread (`snapshot_counts`, `queue_stats`), which
only read, through whichever connection they are given. Nothing here may write or open a
read-write connection: agent/store/writer.py's writer thread is the only writer.

A store the writer thread opened has every table of agent/store/schema.py (its `TABLES`), so
the writer's reads (the 2-s status sampler, the offload policy's depth) never look at the
schema. A read-only view may meet a file an older agent made and the current one has not
opened yet: it asks sqlite-utils which tables the file has, once per connection, and counts
what the file does not keep.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Set
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from agent.base.errors import StoreUnreadable
from agent.base.records import QueueStats
from agent.store.schema import SIZED_TABLES, TABLES, database


def snapshot_counts(conn: sqlite3.Connection, tables: Set[str] = TABLES) -> dict[str, int]:
    """Rows waiting per table, the delivered count and (where the store counts them) drops.
    `tables`: the tables the store has (all of them, for the writer's connection)."""
    counts = {name: rows for name, (rows, _) in _table_sizes(conn, tables).items()}
    counts["delivered"] = _delivered(conn)
    if "drops" in tables:
        dropped = conn.execute("SELECT coalesce(sum(dropped), 0) FROM drops").fetchone()
        counts["dropped"] = int(dropped[0])
    return counts


def queue_stats(conn: sqlite3.Connection, now: float, tables: Set[str] = TABLES) -> QueueStats:
    """Depths, bytes and the oldest undelivered row's age: O(1) in the backlog (the sizes the
    triggers keep, and the outbox's first row by seq), so the sampler never holds the writer."""
    sizes = _table_sizes(conn, tables)
    oldest = conn.execute("SELECT created_at FROM outbox ORDER BY seq LIMIT 1").fetchone()
    return QueueStats(
        inbox=sizes["inbox"][0], inbox_bytes=sizes["inbox"][1], outbox=sizes["outbox"][0],
        outbox_bytes=sizes["outbox"][1], dead_letter=sizes["dead_letter"][0],
        delivered=_delivered(conn),
        oldest_undelivered_s=None if oldest is None else max(0.0, now - float(oldest[0])),
    )


def _table_sizes(conn: sqlite3.Connection, tables: Set[str]) -> dict[str, tuple[int, int]]:
    """Rows and payload bytes of the inbox, the outbox and the dead letters, from the `sizes`
    table the triggers keep (O(1)); counted only for a table an older store kept no size of
    (read by the operator's commands before the agent upgraded it)."""
    kept: dict[str, tuple[int, int]] = {}
    if "sizes" in tables:
        kept = {str(name): (int(rows), int(size)) for name, rows, size
                in conn.execute("SELECT name, rows, bytes FROM sizes")}
    for table in SIZED_TABLES:
        if table not in kept:
            rows, size = conn.execute(
                f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM {table}").fetchone()
            kept[table] = (int(rows), int(size))
    return kept


def _delivered(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM counters WHERE name = 'delivered'").fetchone()
    return int(row[0]) if row else 0


@contextmanager
def _read_only(path: Path) -> Iterator[sqlite_utils.Database]:
    """A read-only connection to the store at `path`, closed on the way out; any SQLite error
    inside becomes StoreUnreadable, with SQLite's name for it."""
    if not path.is_file():
        raise StoreUnreadable(f"no store at {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise _unreadable(path, exc) from exc
    try:
        yield database(conn)
    except sqlite3.Error as exc:
        raise _unreadable(path, exc) from exc
    finally:
        conn.close()


def _unreadable(path: Path, exc: sqlite3.Error) -> StoreUnreadable:
    return StoreUnreadable(f"{path}: {getattr(exc, 'sqlite_errorname', type(exc).__name__)}: "
                           f"{exc}")


def read_drops(path: Path) -> dict[str, int]:
    """Rows dropped at the outbox bound, per route, read-only (none for a store that predates
    the count)."""
    with _read_only(path) as db:
        return {str(row["route"]): int(row["dropped"])
                for row in db.table("drops").rows_where(select="route, dropped")}


def read_counts(path: Path) -> dict[str, int]:
    """Row counts read through a separate read-only connection: safe while the agent runs."""
    with _read_only(path) as db:
        return snapshot_counts(db.conn, frozenset(db.table_names()))


def read_stats(path: Path) -> QueueStats:
    """QueueStats through a separate read-only connection: safe while the agent runs."""
    with _read_only(path) as db:
        return queue_stats(db.conn, time.time(), frozenset(db.table_names()))


def read_dead_letters(path: Path, limit: int = 100) -> list[dict[str, Any]]:
    """The newest dead letters with their reasons, read-only."""
    with _read_only(path) as db:
        return list(db.table("dead_letter").rows_where(order_by="seq desc", limit=limit))


# The columns `edge-agent queue` shows of each table's oldest rows (never the payloads).
_OLDEST_COLUMNS = {
    "inbox": "seq, id, topic, route, priority, received_at AS at, attempts, leased, "
             "length(payload) AS payload_bytes",
    "outbox": "seq, id, kind, topic, priority, created_at AS at, "
              "length(payload) AS payload_bytes",
}


def read_oldest(path: Path, table: str, limit: int = 10) -> list[dict[str, Any]]:
    """The oldest rows of `inbox` or `outbox` (without payloads), read-only."""
    columns = _OLDEST_COLUMNS[table]
    with _read_only(path) as db:
        return list(db.table(table).rows_where(select=columns, order_by="seq", limit=limit))


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A result row of the outbox as the agent queued it: its body is the JSON it publishes."""

    seq: int
    created_at: float
    body: bytes
    id: str = ""


@dataclass(frozen=True, slots=True)
class AnsweredReading:
    """A row of the history: one reading's ok result, kept after its delivery. `reading` and
    `output` are JSON text."""

    seq: int
    created_at: float
    id: str
    topic: str
    reading: str
    output: str
    received_at: float
    model_name: str
    model_version: str
    executor: str


class RouteReader:
    """One route's rows, on the single read-only connection of `read_route`."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self._conn = db.conn
        # A store an older agent made and the current one has not opened yet has none.
        self.has_history = db.table("history").exists()

    def _pages(self, table: str, select: str, where: str, params: tuple[Any, ...],
               page: int) -> Iterator[Any]:
        """Rows of `table` by seq, up to the last seq it has now, in pages of `page` rows,
        each page its own short read, so that a long export never pins the WAL a running
        agent's checkpoints need; rows added after the first page are left for the next
        export (the export ends) and rows deleted meanwhile are gone from it."""
        last = self._conn.execute(f"SELECT coalesce(max(seq), 0) FROM {table}").fetchone()[0]
        after = 0
        while True:
            rows = self._conn.execute(
                f"SELECT seq, {select} FROM {table} WHERE {where} AND seq > ? AND seq <= ? "
                "ORDER BY seq LIMIT ?", (*params, after, last, page)).fetchall()
            yield from rows
            if len(rows) < page:
                return
            after = int(rows[-1][0])

    def results(self, route: str, since: float | None = None,
                page: int = 500) -> Iterator[StoredResult]:
        """The route's results still in the outbox (queued, not yet delivered) whose reading
        is not in the history, oldest first, made at or after `since` (epoch seconds)."""
        where = "kind = 'result' AND route = ? AND created_at >= ?"
        if self.has_history:
            where += " AND NOT EXISTS (SELECT 1 FROM history WHERE history.id = outbox.id)"
        for seq, created_at, payload, id_ in self._pages(
                "outbox", "created_at, payload, id", where, (route, _since(since)), page):
            yield StoredResult(int(seq), float(created_at), bytes(payload), str(id_))

    def history(self, route: str, since: float | None = None,
                page: int = 500) -> Iterator[AnsweredReading]:
        """The route's answered readings in the history (delivered or not), oldest first, made
        at or after `since`; none from a store without a history."""
        if not self.has_history:
            return
        for row in self._pages(
                "history", "created_at, id, topic, reading, output, received_at, model_name, "
                "model_version, executor", "route = ? AND created_at >= ?",
                (route, _since(since)), page):
            yield AnsweredReading(int(row[0]), float(row[1]), str(row[2]), str(row[3]),
                                  str(row[4]), str(row[5]), float(row[6]), str(row[7]),
                                  str(row[8]), str(row[9]))

    def waiting(self, route: str) -> int:
        """The route's readings still in the inbox (no result yet)."""
        row = self._conn.execute("SELECT count(*) FROM inbox WHERE route = ?",
                                 (route,)).fetchone()
        return int(row[0])

    def dead_letter_topics(self, since: float | None = None) -> list[str]:
        """The topic of every dead letter made at or after `since` (the table keeps no route:
        the caller matches the topics to its route's filters)."""
        return [str(topic) for (topic,) in self._conn.execute(
            "SELECT topic FROM dead_letter WHERE created_at >= ?", (_since(since),))]


def _since(since: float | None) -> float:
    return since if since is not None else float("-inf")


@contextmanager
def read_route(path: Path) -> Iterator[RouteReader]:
    """A RouteReader over one read-only connection to the store at `path`: safe while the agent
    runs; any SQLite error inside the block becomes StoreUnreadable."""
    with _read_only(path) as db:
        yield RouteReader(db)
