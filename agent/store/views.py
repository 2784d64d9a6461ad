"""Read-only views of the store for the operator's commands (`edge-agent status`, `queue`).

Owns the `read_*` functions, each on a separate read-only connection (`mode=ro`) opened and
closed per call, so they are safe while the agent runs; and the counting queries they share
with the writer thread (`snapshot_counts`, `queue_stats`), which only read, through whichever
connection they are given. Nothing here may write or open a read-write connection:
agent/store/writer.py's writer thread is the only writer.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlite_utils

from agent.base.errors import StoreUnreadable
from agent.base.records import QueueStats


def snapshot_counts(db: sqlite_utils.Database) -> dict[str, int]:
    conn = db.conn
    counts = {name: rows for name, (rows, _) in _table_sizes(conn).items()}
    counts["delivered"] = _delivered(conn)
    if db["drops"].exists():
        dropped = db.execute("SELECT coalesce(sum(dropped), 0) FROM drops").fetchone()
        counts["dropped"] = int(dropped[0])
    return counts


def _table_sizes(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """Rows and payload bytes of the inbox, the outbox and the dead letters, from the `sizes`
    table the triggers keep (O(1)); counted only for a table a store made before it had one
    (an older file read by the operator's commands before the agent upgraded it)."""
    kept: dict[str, tuple[int, int]] = {}
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sizes'").fetchone():
        kept = {str(name): (int(rows), int(size)) for name, rows, size
                in conn.execute("SELECT name, rows, bytes FROM sizes")}
    for table in ("inbox", "outbox", "dead_letter"):
        if table not in kept:
            rows, size = conn.execute(
                f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM {table}").fetchone()
            kept[table] = (int(rows), int(size))
    return kept


def _delivered(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM counters WHERE name = 'delivered'").fetchone()
    return int(row[0]) if row else 0


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


def queue_stats(conn: sqlite3.Connection, now: float) -> QueueStats:
    """Depths, bytes and the oldest undelivered row's age: O(1) in the backlog (the sizes the
    triggers keep, and the outbox's first row by seq), so the sampler never holds the writer."""
    sizes = _table_sizes(conn)
    oldest = conn.execute("SELECT created_at FROM outbox ORDER BY seq LIMIT 1").fetchone()
    return QueueStats(
        inbox=sizes["inbox"][0], inbox_bytes=sizes["inbox"][1], outbox=sizes["outbox"][0],
        outbox_bytes=sizes["outbox"][1], dead_letter=sizes["dead_letter"][0],
        delivered=_delivered(conn),
        oldest_undelivered_s=None if oldest is None else max(0.0, now - float(oldest[0])),
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
