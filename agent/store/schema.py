"""The store's file: its connection, schema and upgrades, transactions, and the carried clock.

Owns how the database is opened (WAL, synchronous=FULL), what it holds (the schema and the
triggers that keep `sizes`), how an older file is upgraded at open, `Transaction` (BEGIN
IMMEDIATE ... COMMIT, or ROLLBACK), and the monotonic clock of outbox ages carried across
reboots. Everything here runs on agent/store/writer.py's writer thread, on the connection that
thread created; nothing here may be called from the event loop or hand a connection to another
thread.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import sqlite_utils

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
-- The id of the last reading (or dead letter) taken on each topic: a retained message the
-- local broker sends again on a resubscribe is its topic's last value, so when its id is
-- this one it was answered already (ingest skips it). One row per topic.
CREATE TABLE IF NOT EXISTS last_reading (
    topic TEXT PRIMARY KEY,
    id TEXT NOT NULL
);
"""

# Kept by triggers so that the bound check and the status sampler cost O(1) whatever the
# backlog (a count(*) over 200k rows held the writer thread 68 ms); recounted at every open.
SIZED_TABLES = ("inbox", "outbox", "dead_letter")

# Every table of a store open_schema has opened: the writer thread's own reads need not look.
TABLES = frozenset({"inbox", "outbox", "dead_letter", "counters", "drops", "clock", "sizes",
                    "last_reading"})

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


def connect(path: Path, max_page_count: int | None = None,
            wal_bytes: int | None = None) -> sqlite3.Connection:
    """The writer's connection. `wal_bytes` bounds the WAL: it is folded into the database
    once it holds that much, and truncated back to it afterwards (SQLite's default folds at
    about 4 MB and never shrinks the file; on a small disk that is room the store cannot use)."""
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    db = sqlite_utils.Database(conn)
    if int(conn.execute("PRAGMA page_count").fetchone()[0]) == 0:
        # A new store can give pages a drain emptied back to the filesystem, to take the drain
        # reserve again (agent/store/transactions.py give_back). Only before the first table: a
        # store made without it keeps its free pages (VACUUM would need twice its size on disk).
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA busy_timeout=5000")
    if wal_bytes is not None:
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        db.execute(f"PRAGMA wal_autocheckpoint={max(16, int(wal_bytes) // page_size)}")
        db.execute(f"PRAGMA journal_size_limit={int(wal_bytes)}")
    if max_page_count is not None:
        db.execute(f"PRAGMA max_page_count={int(max_page_count)}")
    return conn


class Transaction:
    """`with Transaction(conn):` is BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error."""

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


def open_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA + "".join(SIZE_TRIGGERS.format(table=t) for t in SIZED_TABLES))
    with Transaction(conn):
        columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
        if "route" not in columns:  # a store made before drops were counted per route
            conn.execute("ALTER TABLE outbox ADD COLUMN route TEXT NOT NULL DEFAULT ''")
        conn.execute("CREATE INDEX IF NOT EXISTS outbox_victims ON outbox (priority, seq)")
        for table in SIZED_TABLES:
            conn.execute(
                f"INSERT OR REPLACE INTO sizes (name, rows, bytes) "
                f"SELECT '{table}', count(*), coalesce(sum(length(payload)), 0) FROM {table}"
            )
        if "created_mono" not in columns:  # a store made before per-route TTLs
            conn.execute("ALTER TABLE outbox ADD COLUMN created_mono REAL NOT NULL DEFAULT 0")
        # TTL expiry runs every second while the uplink works: a range on this index, not a
        # scan of the whole backlog.
        conn.execute("CREATE INDEX IF NOT EXISTS outbox_age ON outbox (route, created_mono)")
        _carry_ages_across_boots(conn)
        # Leases belong to the process that took them; after a restart every reading is free.
        conn.execute("UPDATE inbox SET leased = 0 WHERE leased = 1")


def monotonic() -> float:
    """The clock of outbox ages (a seam for the reboot test)."""
    return time.monotonic()


def boot_id() -> str:
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
    boot, now = boot_id(), monotonic()
    row = conn.execute("SELECT boot_id, last_mono FROM clock WHERE id = 1").fetchone()
    if row is not None:
        last_boot, last_mono = str(row[0]), float(row[1])
        rebooted = boot != last_boot if boot and last_boot else now < last_mono
        if rebooted:
            conn.execute("UPDATE outbox SET created_mono = created_mono - ?", (last_mono,))
    touch_clock(conn, boot, now)


def touch_clock(conn: sqlite3.Connection, boot: str, now: float) -> None:
    conn.execute("INSERT INTO clock (id, boot_id, last_mono) VALUES (1, ?, ?) ON CONFLICT (id) "
                 "DO UPDATE SET boot_id = excluded.boot_id, last_mono = excluded.last_mono",
                 (boot, now))
