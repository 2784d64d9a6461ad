"""What the store's queries cost and how its SQLite errors are classified (issue 12): the
periodic reads cost the same whatever the backlog, measured in SQLite virtual-machine steps on
real files rather than in milliseconds, so a loaded machine cannot decide the test; errors are
told apart by SQLite's result code, never by the message's text."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.base.records import DeadLetter, NewOutboxRow, Reading
from agent.store import transactions
from agent.store.views import queue_stats, read_counts, read_stats, snapshot_counts
from agent.store.writer import Store


def make_store(path: Path, outbox: int, inbox: int, dead: int) -> None:
    """A store with `outbox` results, `inbox` readings and `dead` dead letters waiting."""

    async def fill() -> None:
        store = await Store.open(path)
        try:
            await store.ingest(
                [Reading(f"in{i}", "s/t", b'{"c": 1}', 1.0, "t", 0) for i in range(inbox)],
                [(DeadLetter(f"dl{i}", "s/t", b"x", "bad", 1.0),
                  NewOutboxRow(f"dl{i}", "dead_letter", "edge/gw/dead_letters", b"{}", 0, ""))
                 for i in range(dead)])
            for start in range(0, outbox, 5000):
                await store._call(_results, start, min(outbox, start + 5000), use="write")
        finally:
            await store.close()

    asyncio.run(fill())


def _results(conn: sqlite3.Connection, start: int, end: int) -> None:
    with transactions.Transaction(conn):
        for i in range(start, end):
            transactions._insert_outbox(conn, NewOutboxRow(
                f"r{i}", "result", "edge/gw/results/t", b"y" * 200, 0, "t"))


def vm_steps(path: Path, query: Callable[[sqlite3.Connection], Any]) -> tuple[int, Any]:
    """SQLite virtual-machine steps (in units of 10) that `query` took, and its answer."""
    conn = sqlite3.connect(path)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    try:
        conn.set_progress_handler(count, 10)
        answer = query(conn)
    finally:
        conn.close()
    return steps, answer


def test_status_sample_and_depths_take_the_same_steps_at_40_rows_and_at_40_000(
    tmp_path: Path,
) -> None:
    """queue_stats (the 2-s status sampler) and the depth snapshot read the trigger-kept sizes
    and the first outbox row: the same number of SQLite steps with 40 or 40,000 rows waiting,
    and figures equal to a full count."""
    small, large = tmp_path / "small.db", tmp_path / "large.db"
    make_store(small, outbox=20, inbox=10, dead=10)
    make_store(large, outbox=20_000, inbox=10_000, dead=10_000)

    for query in (lambda c: queue_stats(c, 2.0), snapshot_counts):
        few, _ = vm_steps(small, query)
        many, _ = vm_steps(large, query)
        assert many <= few + 2, f"{few} steps at 40 rows, {many} at 40,000"

    stats = read_stats(large)
    counts = read_counts(large)
    with sqlite3.connect(large) as conn:
        inbox, inbox_bytes = conn.execute(
            "SELECT count(*), sum(length(payload)) FROM inbox").fetchone()
        outbox, outbox_bytes = conn.execute(
            "SELECT count(*), sum(length(payload)) FROM outbox").fetchone()
        dead = conn.execute("SELECT count(*) FROM dead_letter").fetchone()[0]
    assert (stats.inbox, stats.inbox_bytes) == (inbox, inbox_bytes) == (10_000, 10_000 * 8)
    assert (stats.outbox, stats.outbox_bytes) == (outbox, outbox_bytes)
    assert stats.dead_letter == dead == counts["dead_letter"] == 10_000
    assert counts["outbox"] == outbox == 30_000  # 20,000 results and 10,000 dead-letter reports
    assert stats.oldest_undelivered_s is not None


def test_ttl_expiry_and_window_leases_do_not_scan_the_backlog(tmp_path: Path) -> None:
    """Expiry (every second while the uplink works) reads a range of the outbox_age index, and a
    growing window counts the route's backlog only up to its cap: the same number of steps with
    20 or 20,000 rows waiting."""
    small, large = tmp_path / "small.db", tmp_path / "large.db"
    make_store(small, outbox=20, inbox=20, dead=0)
    make_store(large, outbox=20_000, inbox=20_000, dead=0)

    def expire_none(conn: sqlite3.Connection) -> dict[str, int]:
        conn.isolation_level = None
        return transactions.expire(conn, {"t": 1e9})

    def window(conn: sqlite3.Connection) -> int:
        conn.isolation_level = None
        return len(transactions.lease_window(conn, {"t": (4, 16)}, ()))

    for query in (expire_none, window):
        few, _ = vm_steps(small, query)
        many, _ = vm_steps(large, query)
        assert many <= few * 2 + 10, f"{query.__name__}: {few} steps at 20 rows, {many} at 20,000"
    assert vm_steps(large, window)[1] == 16


def test_sqlite_errors_are_classified_by_result_code_not_by_their_text(tmp_path: Path) -> None:
    """Errors raised by real SQLite: a full database is StoreFull, a lock is StoreUnavailable
    (handled like a full store: wait and retry), a file that is not a database is StoreDamaged,
    and a missing table whose name contains "full" stays what it is (the old test of the
    message's text called it a full store)."""
    from agent.base.errors import StoreDamaged, StoreFull, StoreUnavailable
    from agent.store.writer import _translate

    def error_of(path: Path, *statements: str, other: str | None = None) -> sqlite3.Error:
        conn = sqlite3.connect(path, isolation_level=None, timeout=0)
        holder = sqlite3.connect(path, isolation_level=None) if other else None
        try:
            if holder is not None and other is not None:
                holder.execute(other)
            for statement in statements:
                conn.execute(statement)
        except sqlite3.Error as exc:
            return exc
        finally:
            conn.close()
            if holder is not None:
                holder.close()
        raise AssertionError(f"no error from {statements}")

    full = error_of(tmp_path / "full.db", "PRAGMA max_page_count = 2",
                    "CREATE TABLE t (x BLOB)", "INSERT INTO t VALUES (zeroblob(100000))")
    (tmp_path / "busy.db").write_bytes(b"")
    sqlite3.connect(tmp_path / "busy.db").execute("CREATE TABLE t (x)").connection.close()
    busy = error_of(tmp_path / "busy.db", "BEGIN IMMEDIATE", other="BEGIN EXCLUSIVE")
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    junk = error_of(tmp_path / "junk.db", "SELECT * FROM sqlite_master")
    missing = error_of(tmp_path / "other.db", "SELECT * FROM full_outbox")

    assert isinstance(_translate(full), StoreFull)
    assert not isinstance(_translate(full), StoreUnavailable)
    assert isinstance(_translate(busy), StoreUnavailable)
    assert isinstance(_translate(junk), StoreDamaged)
    translated = _translate(missing)
    assert translated is missing
    assert "full" in str(missing)
