"""The store's file: its connection, schema and upgrades, transactions, and the carried clock.

Owns how the database is opened (WAL, synchronous=FULL), what it holds (the tables, their
indexes and the triggers that keep `sizes`), how an older file is upgraded at open, `Transaction`
(BEGIN IMMEDIATE ... COMMIT, or ROLLBACK), and the monotonic clock of outbox ages carried across
reboots. Everything here runs on agent/store/writer.py's writer thread, on the connection that
thread created; nothing here may be called from the event loop or hand a connection to another
thread.

sqlite-utils (4.x: its schema calls join the caller's transaction as savepoints, where 3.x
committed it) makes and upgrades the schema: `create(..., if_not_exists=True)` for the tables it
can state exactly, `add_column` for the columns added since a store was made, `create_index`,
and its introspection (`triggers_dict`, `columns_dict`) to tell what an older file lacks. What
it cannot state stays SQL here, each with its reason: AUTOINCREMENT, CHECK, a UNIQUE over two
columns (HAND_WRITTEN_TABLES), and the size triggers (it has no API for a trigger of one's own;
its `enable_counts` keeps row counts only, where the outbox bound needs bytes too).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import sqlite_utils
from sqlite_utils.db import DescIndex

# The tables whose seq must never be reused, and the clock's single row: sqlite-utils' create()
# has no AUTOINCREMENT (simonw/sqlite-utils#664), no CHECK (#358) and no UNIQUE over two
# columns (#558). AUTOINCREMENT carries weight in the outbox: without it a row that expires or
# is dropped while in flight gives its seq to the next row, which the uplink's after_seq cursor
# then skips and the late PUBACK of the first deletes undelivered.
HAND_WRITTEN_TABLES = {
    "inbox": """
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
);""",
    # `route` and `created_mono` came after the first stores: OUTBOX_ADDED_COLUMNS adds them to
    # those, with the same type, NOT NULL and default as here.
    "outbox": """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    priority INTEGER NOT NULL,
    created_at REAL NOT NULL,
    route TEXT NOT NULL DEFAULT '',
    created_mono REAL NOT NULL DEFAULT 0,
    UNIQUE (kind, id)
);""",
    "dead_letter": """
CREATE TABLE IF NOT EXISTS dead_letter (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    received_at REAL NOT NULL,
    created_at REAL NOT NULL
);""",
    "clock": """
CREATE TABLE IF NOT EXISTS clock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    boot_id TEXT NOT NULL,
    last_mono REAL NOT NULL
);""",
}

# Columns added to the outbox since the first stores: (name, type, default), all NOT NULL.
OUTBOX_ADDED_COLUMNS: tuple[tuple[str, type, object], ...] = (
    ("route", str, ""),           # drops counted per route
    ("created_mono", float, 0),   # per-route TTLs in monotonic time
)

# Every table of a store this module has opened: the writer thread's own reads need not look.
TABLES = frozenset({"inbox", "outbox", "dead_letter", "counters", "drops", "clock", "sizes",
                    "last_reading", "history"})

# Kept by triggers so that the bound check and the status sampler cost O(1) whatever the
# backlog (a count(*) over 200k rows held the writer thread 68 ms). Counted only when a table's
# triggers are new (a store made before them) or its row is missing: once the triggers exist,
# they change the row in the same transaction as the table, so a count at every start would
# only cost O(backlog), the dead letters' most of all (they are never deleted).
SIZED_TABLES = ("inbox", "outbox", "dead_letter")
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


def database(conn: sqlite3.Connection) -> sqlite_utils.Database:
    """sqlite-utils over one of the store's connections. Without plugins: an installed
    sqlite-utils plugin's prepare_connection hook would otherwise run on every connection the
    store opens, the writer's included, and the entry-point scan that finds them costs each
    `edge-agent status` start 20 to 50 ms (measured on a 2-core machine)."""
    return sqlite_utils.Database(conn, execute_plugins=False)


def connect(path: Path, max_page_count: int | None = None,
            wal_bytes: int | None = None) -> sqlite3.Connection:
    """The writer's connection. `wal_bytes` bounds the WAL: it is folded into the database
    once it holds that much, and truncated back to it afterwards (SQLite's default folds at
    about 4 MB and never shrinks the file; on a small disk that is room the store cannot use)."""
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    db = database(conn)
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
    """`with Transaction(conn):` is BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error.

    Not sqlite-utils' `db.atomic()`. That measures as fast (paired runs on one file: ingest of
    256 readings and a lease with its completion within 5% of this, wall and CPU) but differs
    where the store relies on it. It opens with a plain (deferred) BEGIN: a transaction that
    reads first takes the write lock only at its first write, and if another connection wrote
    since the read, fails there with SQLITE_BUSY_SNAPSHOT and no busy wait; BEGIN IMMEDIATE takes
    the lock at once, under busy_timeout. And inside an open transaction atomic() becomes a
    SAVEPOINT whose end commits nothing, where a hand-off must be committed when its block ends
    (ingest acks the batch after it): a Transaction inside another is an error instead.
    """

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
    """Make the schema, or bring an older store's up to it, in one transaction; then carry the
    outbox ages across a reboot and free the leases of the process before."""
    db = database(conn)
    with Transaction(conn):
        had_triggers = db.triggers_dict.keys()
        _create_tables(db)
        _keep_sizes(db, [table for table in SIZED_TABLES
                         if not {f"{table}_added", f"{table}_removed"} <= had_triggers])
        outbox = db.table("outbox")
        columns = outbox.columns_dict
        for name, kind, default in OUTBOX_ADDED_COLUMNS:
            if name not in columns:
                outbox.add_column(name, kind, not_null_default=default)
        # The bound's victims (lowest priority, oldest) and TTL expiry, which runs every second
        # while the uplink works: ranges on these indexes, not scans of the whole backlog.
        outbox.create_index(["priority", "seq"], index_name="outbox_victims",
                            if_not_exists=True)
        outbox.create_index(["route", "created_mono"], index_name="outbox_age",
                            if_not_exists=True)
        _carry_ages_across_boots(conn)
        # Leases belong to the process that took them; after a restart every reading is free.
        conn.execute("UPDATE inbox SET leased = 0 WHERE leased = 1")


def _create_tables(db: sqlite_utils.Database) -> None:
    """Every table that does not exist yet, in the order they were always made (so that a new
    file's pages are laid out as before: the corrupt-store tests flip bytes at a fixed page)."""
    db.executescript(HAND_WRITTEN_TABLES["inbox"])
    db.table("inbox").create_index(["leased", DescIndex("priority"), "seq"],
                                   index_name="inbox_next", if_not_exists=True)
    db.executescript(HAND_WRITTEN_TABLES["outbox"])
    db.executescript(HAND_WRITTEN_TABLES["dead_letter"])
    db.table("counters").create({"name": str, "value": int}, pk="name", not_null={"value"},
                                if_not_exists=True)
    db.table("drops").create({"route": str, "dropped": int, "reported": int}, pk="route",
                             not_null={"dropped", "reported"},
                             defaults={"dropped": 0, "reported": 0}, if_not_exists=True)
    db.executescript(HAND_WRITTEN_TABLES["clock"])
    db.table("sizes").create({"name": str, "rows": int, "bytes": int}, pk="name",
                             not_null={"rows", "bytes"}, if_not_exists=True)
    # The id of the last reading (or dead letter) taken on each topic: a retained message the
    # local broker sends again on a resubscribe is its topic's last value, so when its id is
    # this one it was answered already (ingest skips it). One row per topic.
    db.table("last_reading").create({"topic": str, "id": str}, pk="topic", not_null={"id"},
                                    if_not_exists=True)
    # Answered readings kept after their result is delivered, for `edge-agent queue export`
    # (agent/store/transactions.py record_history): bounded by [store] history_max_rows and
    # the first thing the store gives up when room runs short. `seq` is the rowid (no
    # AUTOINCREMENT: a seq given again after the table emptied costs nothing, nothing points
    # at it), so the bound deletes a range of it. No size triggers: the bound counts rows,
    # and without triggers a DELETE of every row is SQLite's truncate, a few pages written
    # even on a full disk. `id` is indexed for the export, which leaves out an outbox row
    # whose reading is in the history.
    history = db.table("history")
    history.create({"seq": int, "id": str, "route": str, "topic": str, "reading": str,
                    "output": str, "model_name": str, "model_version": str, "executor": str,
                    "received_at": float, "created_at": float}, pk="seq",
                   not_null={"id", "route", "topic", "reading", "output", "model_name",
                             "model_version", "executor", "received_at", "created_at"},
                   if_not_exists=True)
    history.create_index(["id"], index_name="history_id", if_not_exists=True)


def _keep_sizes(db: sqlite_utils.Database, untracked: list[str]) -> None:
    """Give the tables in `untracked` their size triggers and count them; count any other
    table whose `sizes` row is missing. In open_schema's transaction: no row can come or go
    between a count and the triggers that keep it from then on."""
    counted = {str(row["name"]) for row in db.table("sizes").rows_where(select="name")}
    for table in SIZED_TABLES:
        if table in untracked:
            db.executescript(SIZE_TRIGGERS.format(table=table))
        elif table in counted:
            continue
        db.execute(f"INSERT OR REPLACE INTO sizes (name, rows, bytes) SELECT '{table}', "
                   f"count(*), coalesce(sum(length(payload)), 0) FROM {table}")


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
