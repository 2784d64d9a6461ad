"""Read-only views of the store for the operator's commands (`edge-agent status`, `queue`).

Owns the `read_*` functions, each on a separate read-only connection (`mode=ro`) opened and
closed per call, so they are safe while the agent runs; and the counting queries they share
with the writer thread (`snapshot_counts`, `queue_stats`), which only read, through whichever
connection they are given. Nothing here may write or open a read-write connection:
agent/store.py's writer thread is the only writer.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlite_utils

from agent.errors import StoreUnreadable
from agent.records import QueueStats


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
