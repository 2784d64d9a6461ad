"""The transactions agent/store/writer.py's writer thread runs: every hand-off, each in one
transaction.

Owns the SQL of each stage's hand-off: ingest (readings and dead letters), leases and their
release, completion into the outbox (and the history of answered readings, its bound and its
yielding to a full store), the outbox bound and its drops, TTL expiry, drop reports,
delivery, and the writer's own reads (depths, stats, integrity). Each function takes the writer
thread's connection as its first argument and is submitted by `Store._call`; none may be called
from the event loop, open a connection of its own, or translate SQLite's errors (the writer
thread does that, once).

The SQL here is written by hand, not through sqlite-utils' table methods (which make the
schema, agent/store/schema.py): the hand-offs' conditions (INSERT ... WHERE NOT EXISTS,
ON CONFLICT DO NOTHING, UPDATE ... RETURNING, counters that add) have no form there, its
insert(ignore=True) is INSERT OR IGNORE, which would also drop a row that breaks NOT NULL, and
where a form exists it costs more: delivery's DELETE through delete_where() took as long (the
fsync dominates) but 9 to 11% more of the writer thread's CPU per 64-row batch (a sqlite_master
lookup and a savepoint on every call; paired runs, 3 of them).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.base.errors import OutboxFull, StoreFull
from agent.base.records import DeadLetter, NewOutboxRow, OutboxRow, QueueStats, Reading
from agent.config.settings import StoreSection

# The clock is called through its module (`schema.monotonic()`), so that the reboot test
# can replace it for the whole store in one place.
from agent.store import schema
from agent.store.schema import Transaction, touch_clock
from agent.store.views import queue_stats, snapshot_counts


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """What one ingest batch did: new readings, duplicates ignored, dead letters recorded."""

    accepted: int
    duplicates: int
    dead_lettered: int


def expire(conn: sqlite3.Connection, ttls: dict[str, float]) -> dict[str, int]:
    """Delete result rows older than their route's TTL; count them as drops of `<route>/ttl`."""
    now = schema.monotonic()
    expired: dict[str, int] = {}
    with Transaction(conn):
        touch_clock(conn, schema.boot_id(), now)
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
    rows, size = conn.execute(
        "SELECT sum(rows), sum(bytes) FROM sizes WHERE name IN ('inbox', 'outbox')"
    ).fetchone()
    return int(rows or 0), int(size or 0)


def room_bytes(conn: sqlite3.Connection) -> int:
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


def input_refusal(conn: sqlite3.Connection, bounds: StoreSection,
                  held_back: int = 0) -> StoreFull | None:
    """Why the store cannot take input now, or None. Below `reserve_bytes` (plus `held_back`,
    the drain reserve's bytes while its file is released) of room, the WAL is first folded into
    the database and truncated: its file is room the input may not spend either."""
    needed = bounds.reserve_bytes + held_back
    room = room_bytes(conn)
    if room < needed:
        checkpoint(conn)
        room = room_bytes(conn)
    if room < needed:
        # A store filled to the last page by readings could not turn them into results (a
        # result is larger than its reading): the deadlock this reserve prevents.
        return StoreFull(f"store is full: {room} bytes left, below the reserve of "
                         f"{needed} bytes; refusing input")
    if bounds.when_full == "refuse_input":
        rows, size = _sizes(conn)
        if rows >= bounds.max_outbox_rows or size >= bounds.max_outbox_bytes:
            return OutboxFull(f"outbox at its bound ({rows} rows, {size} bytes waiting; "
                              f"max {bounds.max_outbox_rows} rows, {bounds.max_outbox_bytes} "
                              "bytes); refusing input")
    return None


def checkpoint(conn: sqlite3.Connection) -> bool:
    """Fold the WAL into the database and truncate it to zero bytes; True if it all went.
    Fails (False) while the database file cannot grow by what the WAL adds to it."""
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.Error as exc:
        if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
            return False
        raise
    return not busy


def free_page_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the database's free pages (room inside the file)."""
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    return page_size * int(conn.execute("PRAGMA freelist_count").fetchone()[0])


def give_back(conn: sqlite3.Connection, nbytes: int) -> bool:
    """Return at least `nbytes` of free pages to the filesystem (the file shrinks when the WAL
    is folded); False for a store made without incremental auto-vacuum or too few free pages."""
    if int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:  # 2: INCREMENTAL
        return False
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    pages = -(-nbytes // page_size)
    if int(conn.execute("PRAGMA freelist_count").fetchone()[0]) < pages:
        return False
    # executescript steps the pragma to the end: execute() would free a single page.
    conn.executescript(f"PRAGMA incremental_vacuum({pages});")
    return checkpoint(conn)


def ingest(
    conn: sqlite3.Connection,
    readings: Sequence[Reading],
    dead: Sequence[tuple[DeadLetter, NewOutboxRow]],
    bounds: StoreSection,
    held_back: int = 0,
) -> IngestOutcome:
    refusal = input_refusal(conn, bounds, held_back)
    if refusal is not None:
        raise refusal
    with Transaction(conn):
        # A redelivered reading whose result is already waiting in the outbox is not redone.
        # rowcount sums the rows executemany inserted (triggers' rows not counted).
        accepted = conn.executemany(
            "INSERT INTO inbox (id, topic, payload, route, priority, received_at) "
            "SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS "
            "(SELECT 1 FROM outbox WHERE kind = 'result' AND id = ?) "
            "ON CONFLICT (id) DO NOTHING",
            [(r.id, r.topic, r.payload, r.route, r.priority, r.received_at, r.id)
             for r in readings],
        ).rowcount if readings else 0
        dead_lettered = sum(_insert_dead_letter(conn, d, report, bounds) for d, report in dead)
        _remember_last_readings(conn, readings, dead)
    return IngestOutcome(accepted, len(readings) - accepted, dead_lettered)


def _remember_last_readings(conn: sqlite3.Connection, readings: Sequence[Reading],
                            dead: Sequence[tuple[DeadLetter, NewOutboxRow]]) -> None:
    """Record each topic's last id in `last_reading`, in the ingest's transaction."""
    last = {d.topic: d.id for d, _ in dead}
    # A reading wins over a dead letter of the same batch: a retained dead letter taken again
    # only repeats a dead letter, which its unique id makes a no-op.
    last.update((r.topic, r.id) for r in readings)
    conn.executemany(
        "INSERT INTO last_reading (topic, id) VALUES (?, ?) "
        "ON CONFLICT (topic) DO UPDATE SET id = excluded.id",
        list(last.items()),
    )


def took_readings(conn: sqlite3.Connection) -> bool:
    """Whether ingest ever took a reading (or dead letter) into this store."""
    return conn.execute("SELECT 1 FROM last_reading LIMIT 1").fetchone() is not None


def last_readings(conn: sqlite3.Connection, topics: Sequence[str]) -> dict[str, str]:
    """The id of the last reading taken on each of `topics` (those with one)."""
    found: dict[str, str] = {}
    for topic in set(topics):
        row = conn.execute("SELECT id FROM last_reading WHERE topic = ?", (topic,)).fetchone()
        if row is not None:
            found[topic] = str(row[0])
    return found


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
                   bounds: StoreSection | None = None, created_at: float | None = None) -> bool:
    """Add `row` (unless the outbox has its kind and id already: False), then keep the bound."""
    added = conn.execute(
        "INSERT INTO outbox (id, kind, topic, payload, priority, created_at, route, "
        "created_mono) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, id) DO NOTHING",
        (row.id, row.kind, row.topic, row.payload, row.priority,
         time.time() if created_at is None else created_at, row.route, schema.monotonic()),
    ).rowcount > 0
    if bounds is not None and bounds.when_full == "drop_oldest":
        _drop_over_bound(conn, bounds)
    return added


# The history's bound is enforced every this many rows (at most), by one range delete: a
# delete at every insert would add a page or two to every completion's commit.
HISTORY_PRUNE_EVERY = 64


def record_history(conn: sqlite3.Connection, row: NewOutboxRow, created_at: float,
                   max_rows: int) -> bool:
    """Keep the answered reading of a result row in `history` (in the caller's transaction),
    and every HISTORY_PRUNE_EVERY rows delete the oldest beyond `max_rows`, so the table never
    holds more. Only a single reading's ok result: not a failed one (no output), a window's
    (no one reading's answer) or anything else in the outbox. True if a row was added."""
    if max_rows <= 0 or row.kind != "result":
        return False
    try:
        body = json.loads(row.payload)
    except ValueError:
        return False
    if not isinstance(body, dict) or body.get("status") != "ok" or "output" not in body:
        return False
    source, model = body.get("source"), body.get("model")
    if not isinstance(source, dict) or "payload" not in source:
        return False
    if not isinstance(model, dict):
        model = {}
    received_at = source.get("received_at")
    seq = conn.execute(
        "INSERT INTO history (id, route, topic, reading, output, model_name, model_version, "
        "executor, received_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (row.id, row.route, str(source.get("topic") or ""), _json(source["payload"]),
         _json(body["output"]), str(model.get("name") or ""), str(model.get("version") or ""),
         str(body.get("executor") or ""),
         float(received_at) if isinstance(received_at, int | float) else 0.0, created_at),
    ).lastrowid
    every = max(1, min(HISTORY_PRUNE_EVERY, max_rows // 8))
    if seq is not None and seq % every == 0:
        # Down to max_rows - every + 1: the next every - 1 rows fill it up to the bound again.
        conn.execute("DELETE FROM history WHERE seq <= ?", (seq - max_rows + every - 1,))
    return True


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def has_history(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM history LIMIT 1").fetchone() is not None


def prune_history(conn: sqlite3.Connection, max_rows: int) -> int:
    """Delete the oldest history rows beyond `max_rows` (all of them for 0): at open, where
    the bound may have been lowered since the rows were written. The rows deleted."""
    with Transaction(conn):
        if max_rows <= 0:
            return int(conn.execute("DELETE FROM history").rowcount)
        return int(conn.execute(
            "DELETE FROM history WHERE seq <= (SELECT max(seq) FROM history) - ?",
            (max_rows,)).rowcount)


def drop_history(conn: sqlite3.Connection, everything: bool) -> int:
    """Give the history's room back to the store (free pages, which count as room): the older
    half of it, or `everything`. The history is the one thing the store holds that nobody was
    promised, so it yields before input is refused or the drain reserve is spent. The rows
    deleted; 0 if there were none or the delete itself failed."""
    try:
        with Transaction(conn):
            if everything:
                # No WHERE and no triggers: SQLite's truncate, a few pages to write.
                return int(conn.execute("DELETE FROM history").rowcount)
            return int(conn.execute(
                "DELETE FROM history WHERE seq <= "
                "(SELECT (min(seq) + max(seq)) / 2 FROM history)").rowcount)
    except sqlite3.Error:
        # Whatever stopped it (a disk too full even for these pages, an older store opening
        # without the table yet) the caller's own write meets again and reports.
        return 0


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


def _unleased(exclude: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """The WHERE clause (and its parameters) of readings free to lease, less the routes in
    `exclude` (routes waiting for their executor: agent/flows/pipeline.py)."""
    if not exclude:
        return "leased = 0", ()
    return "leased = 0 AND route NOT IN (SELECT value FROM json_each(?))", (json.dumps(
        list(exclude)),)


def lease(conn: sqlite3.Connection, exclude: Sequence[str]) -> Reading | None:
    # A lease is void after any restart and no peer is told anything when one is taken, so its
    # commit need not wait for an fsync: the next synchronous=FULL commit (the result's) syncs
    # the WAL up to and including it. A process crash loses nothing either way (the WAL is in
    # the OS cache); only a power cut may forget one attempt count.
    free, params = _unleased(exclude)
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        with Transaction(conn):
            row = conn.execute(
                "UPDATE inbox SET leased = 1, attempts = attempts + 1 WHERE seq = "
                f"(SELECT seq FROM inbox WHERE {free} ORDER BY priority DESC, seq LIMIT 1) "
                "RETURNING id, topic, payload, received_at, route, priority, attempts", params,
            ).fetchone()
    finally:
        conn.execute("PRAGMA synchronous=FULL")
    if row is None:
        return None
    return Reading(row[0], row[1], bytes(row[2]), row[3], row[4], row[5], row[6])


def release(conn: sqlite3.Connection, reading_id: str, refund: bool) -> None:
    with Transaction(conn):
        conn.execute("UPDATE inbox SET leased = 0, attempts = attempts - ? WHERE id = ?",
                     (int(refund), reading_id))


def complete(conn: sqlite3.Connection, reading_id: str, row: NewOutboxRow,
             bounds: StoreSection, keep_history: bool = True) -> None:
    """Retire the reading, queue its result and (an ok result, `keep_history`, a bound above
    0) keep the answered reading in the history, all in one transaction."""
    now = time.time()
    with Transaction(conn):
        # Retire the reading first: the outbox bound then sees its room in the same transaction.
        conn.execute("DELETE FROM inbox WHERE id = ?", (reading_id,))
        # A result the outbox holds already (the same id) is in the history already too.
        if _insert_outbox(conn, row, bounds, now) and keep_history:
            record_history(conn, row, now, bounds.history_max_rows)


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


def lease_window(conn: sqlite3.Connection, windows: dict[str, tuple[int, int]],
                 exclude: Sequence[str]) -> list[Reading]:
    # Like lease: a lease is void after a restart, so its commit need not wait for an fsync.
    free, params = _unleased(exclude)
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        with Transaction(conn):
            head = conn.execute(
                f"SELECT route FROM inbox WHERE {free} ORDER BY priority DESC, seq LIMIT 1",
                params,
            ).fetchone()
            if head is None:
                return []
            route = str(head[0])
            size, cap = windows.get(route, (1, 1))
            if cap > size:
                # Counted only up to the cap: the window's size needs no more, and a count of
                # the whole backlog would cost O(backlog) for every window.
                backlog = conn.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM inbox WHERE leased = 0 AND route = ? "
                    "LIMIT ?)", (route, cap)
                ).fetchone()[0]
                size = max(size, min(cap, int(backlog)))
            return _lease_some(conn, route, size)
    finally:
        conn.execute("PRAGMA synchronous=FULL")


def lease_route(conn: sqlite3.Connection, route: str, limit: int) -> list[Reading]:
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        with Transaction(conn):
            return _lease_some(conn, route, limit)
    finally:
        conn.execute("PRAGMA synchronous=FULL")


def release_many(conn: sqlite3.Connection, reading_ids: list[str], refund: bool) -> None:
    with Transaction(conn):
        conn.execute("UPDATE inbox SET leased = 0, attempts = attempts - ? "
                     "WHERE id IN (SELECT value FROM json_each(?))",
                     (int(refund), json.dumps(reading_ids)))


def complete_window(conn: sqlite3.Connection, reading_ids: list[str], row: NewOutboxRow,
                     bounds: StoreSection) -> None:
    with Transaction(conn):
        # Retire the readings first: the outbox bound then sees their room in this transaction.
        conn.execute("DELETE FROM inbox WHERE id IN (SELECT value FROM json_each(?))",
                     (json.dumps(reading_ids),))
        _insert_outbox(conn, row, bounds)


def dead_letter_reading(conn: sqlite3.Connection, d: DeadLetter, report: NewOutboxRow,
                         bounds: StoreSection) -> None:
    with Transaction(conn):
        conn.execute("DELETE FROM inbox WHERE id = ?", (d.id,))
        _insert_dead_letter(conn, d, report, bounds)


def report_drops(
    conn: sqlite3.Connection,
    make_row: Callable[[int, dict[str, int], dict[str, int]], NewOutboxRow],
) -> NewOutboxRow | None:
    with Transaction(conn):
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


def integrity_check(conn: sqlite3.Connection) -> list[str]:
    return [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]


def enqueue(conn: sqlite3.Connection, row: NewOutboxRow) -> None:
    with Transaction(conn):
        _insert_outbox(conn, row)


def pending_outbox(conn: sqlite3.Connection, limit: int, after_seq: int) -> list[OutboxRow]:
    """Up to `limit` undelivered rows after `after_seq`, in seq order (the order they were
    committed in; priority decides only which rows the bound drops, not the sending order)."""
    rows = conn.execute(
        "SELECT seq, id, topic, payload, kind FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
        (after_seq, limit),
    ).fetchall()
    return [OutboxRow(seq, id_, topic, bytes(payload), kind)
            for seq, id_, topic, payload, kind in rows]


def mark_delivered(conn: sqlite3.Connection, seqs: list[int]) -> None:
    with Transaction(conn):
        # One statement for the whole group: far cheaper than a DELETE per row.
        conn.execute("DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?))",
                     (json.dumps(seqs),))
        conn.execute(
            "INSERT INTO counters (name, value) VALUES ('delivered', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (len(seqs),),
        )


def depths(conn: sqlite3.Connection) -> dict[str, int]:
    """Row counts for the logs and the metrics: the queues, deliveries, and `dropped` in total
    with `dropped_ttl`, those of it expired past a route's TTL (`<route>/ttl`, see `expire`);
    the rest were dropped at the outbox bound (`_drop_over_bound`)."""
    counts = snapshot_counts(conn)
    ttl = conn.execute(
        "SELECT coalesce(sum(dropped), 0) FROM drops WHERE route LIKE '%/ttl'").fetchone()
    counts["dropped_ttl"] = int(ttl[0])
    return counts


def stats(conn: sqlite3.Connection) -> QueueStats:
    return queue_stats(conn, time.time())
