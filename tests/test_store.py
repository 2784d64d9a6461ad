"""The SQLite store on real files: one transaction per hand-off, dedupe by id, leases."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from agent.base.records import DeadLetter, NewOutboxRow, Reading
from agent.store.schema import connect
from agent.store.views import read_counts
from agent.store.writer import Store


def reading(i: int, priority: int = 0) -> Reading:
    return Reading(f"id{i}", "sensors/a/temperature", b'{"c": %d}' % i, 1.0, "temperature",
                   priority)


def result(i: int) -> NewOutboxRow:
    return NewOutboxRow(f"id{i}", "result", "edge/gw/results/temperature", b"{}", 0)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_connections_use_wal_and_synchronous_full(tmp_path: Path) -> None:
    """Every store connection runs in WAL mode with synchronous=FULL (2)."""
    conn = connect(tmp_path / "s.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    conn.close()


def test_a_redelivered_reading_is_ignored_in_the_inbox_and_after_its_result(tmp_path: Path) -> None:
    """The same id is accepted once while waiting, and not at all once its result is queued."""

    async def scenario() -> tuple[int, int, int]:
        store = await Store.open(tmp_path / "s.db")
        first = await store.ingest([reading(1), reading(1)], [])
        leased = await store.lease()
        assert leased is not None
        await store.complete(leased.id, result(1))
        again = await store.ingest([reading(1)], [])
        await store.close()
        return first.accepted, first.duplicates, again.accepted

    assert run(scenario()) == (1, 1, 0)
    assert read_counts(tmp_path / "s.db") == {"inbox": 0, "outbox": 1, "dead_letter": 0,
                                              "delivered": 0, "dropped": 0}


def test_lease_takes_highest_priority_then_oldest_and_restart_frees_leases(tmp_path: Path) -> None:
    """Leases follow priority then arrival; a lease held by a dead process is void on reopen."""

    async def scenario() -> list[str]:
        store = await Store.open(tmp_path / "s.db")
        await store.ingest([reading(1), reading(2, priority=5), reading(3)], [])
        order = []
        for _ in range(3):
            leased = await store.lease()
            assert leased is not None
            order.append(leased.id)
        assert await store.lease() is None
        await store.close()
        reopened = await Store.open(tmp_path / "s.db")
        again = await reopened.lease()
        await reopened.close()
        assert again is not None
        assert again.attempts == 2
        return order

    assert run(scenario()) == ["id2", "id1", "id3"]


def test_complete_moves_a_reading_to_the_outbox_in_one_transaction(tmp_path: Path) -> None:
    """A completed reading leaves the inbox exactly when its result enters the outbox."""

    async def scenario() -> None:
        store = await Store.open(tmp_path / "s.db")
        await store.ingest([reading(1)], [])
        leased = await store.lease()
        assert leased is not None
        # A result row that violates NOT NULL makes the transaction fail: the inbox keeps it.
        bad = NewOutboxRow("id1", "result", None, b"{}", 0)  # type: ignore[arg-type]
        try:
            await store.complete(leased.id, bad)
        except sqlite3.IntegrityError:
            pass
        else:
            raise AssertionError("a NULL topic was accepted")
        counts = await store.depths()
        assert (counts["inbox"], counts["outbox"]) == (1, 0)
        await store.complete(leased.id, result(1))
        counts = await store.depths()
        assert (counts["inbox"], counts["outbox"]) == (0, 1)
        await store.close()

    run(scenario())


def test_outbox_rows_are_retired_only_when_marked_delivered(tmp_path: Path) -> None:
    """Rows come back in order until marked delivered; the delivered counter counts them."""

    async def scenario() -> None:
        store = await Store.open(tmp_path / "s.db")
        letter = DeadLetter("bad1", "sensors/x", b"\xff", "not UTF-8", 1.0)
        report = NewOutboxRow("bad1", "dead_letter", "edge/gw/deadletter", b"{}", 9)
        await store.ingest([], [(letter, report)])
        for i in range(3):
            await store.ingest([reading(i)], [])
            leased = await store.lease()
            assert leased is not None
            await store.complete(leased.id, result(i))
        pending = await store.pending_outbox(10)
        assert [row.id for row in pending] == ["bad1", "id0", "id1", "id2"]
        await store.mark_delivered([pending[0].seq, pending[1].seq])
        assert [row.id for row in await store.pending_outbox(10)] == ["id1", "id2"]
        assert (await store.depths())["delivered"] == 2
        await store.close()

    run(scenario())


def test_a_lease_leaves_the_connection_at_synchronous_full(tmp_path: Path) -> None:
    """Leases commit without an fsync of their own; every later commit is FULL again."""

    async def scenario() -> int:
        store = await Store.open(tmp_path / "s.db")
        await store.ingest([reading(1)], [])
        await store.lease()
        level: int = await store._call(
            lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]
        )
        await store.close()
        return level

    assert run(scenario()) == 2
