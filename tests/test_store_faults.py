"""The store under its bounds and storage faults, on real SQLite files: the outbox bound and its
policies, a full database (PRAGMA max_page_count), and a corrupt file at open."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from agent.base.errors import OutboxFull, StoreFull
from agent.base.records import NewOutboxRow, Reading
from agent.config.settings import StoreSection
from agent.routing.outbound import Topics, drops_row
from agent.store.reserve import reserve_path
from agent.store.views import read_counts, read_drops
from agent.store.writer import Store
from tests.conftest import flip_bytes

TOPICS = Topics("edge", "gw")


def reading(i: int, size: int = 16) -> Reading:
    payload = json.dumps({"i": i, "pad": "x" * size}).encode()
    return Reading(f"id{i}", "sensors/a/t", payload, 1.0, "t", 0)


def result(i: int, route: str, priority: int, size: int = 100) -> NewOutboxRow:
    return NewOutboxRow(f"{route}{i}", "result", f"edge/gw/results/{route}", b"x" * size,
                        priority, route)


async def produce(store: Store, rows: list[NewOutboxRow]) -> None:
    """Each row goes through the real path: ingest a reading, lease it, complete it."""
    for n, row in enumerate(rows):
        await store.ingest([reading(n)], [])
        leased = await store.lease()
        assert leased is not None
        await store.complete(leased.id, row)


def test_outbox_at_its_row_bound_drops_lowest_priority_oldest_first_and_counts_per_route(
    tmp_path: Path,
) -> None:
    """With room for 4 rows, 3 high-priority and 4 low-priority results keep the 3 high ones and
    the newest low one; the 3 dropped are counted under their route, and reported once."""
    bounds = StoreSection(max_outbox_rows=4)

    async def scenario() -> tuple[list[str], NewOutboxRow | None, NewOutboxRow | None]:
        store = await Store.open(tmp_path / "s.db", bounds)
        rows = [result(0, "low", 1), result(0, "high", 5), result(1, "low", 1),
                result(1, "high", 5), result(2, "low", 1), result(2, "high", 5),
                result(3, "low", 1)]
        await produce(store, rows)
        kept = [row.id for row in await store.pending_outbox(10)]
        report = await store.report_drops(lambda n, d, t: drops_row(TOPICS, n, d, t))
        again = await store.report_drops(lambda n, d, t: drops_row(TOPICS, n, d, t))
        await store.close()
        return kept, report, again

    kept, report, again = asyncio.run(scenario())
    assert kept == ["high0", "high1", "high2", "low3"]
    assert read_drops(tmp_path / "s.db") == {"low": 3}
    assert report is not None
    body = json.loads(report.payload)
    assert body["dropped"] == {"low": 3}
    assert body["dropped_total"] == {"low": 3}
    assert report.topic == "edge/gw/drops"
    assert again is None, "the same drops were reported twice"
    counts = read_counts(tmp_path / "s.db")
    # The report row itself is exempt from the bound and waits in the outbox.
    assert counts["outbox"] == 5
    assert counts["dropped"] == 3


def test_outbox_byte_bound_drops_until_the_new_row_fits(tmp_path: Path) -> None:
    """With 1000 bytes of room, ten 300-byte results leave the newest three; seven dropped."""
    bounds = StoreSection(max_outbox_bytes=1024, max_outbox_rows=1000)

    async def scenario() -> list[str]:
        store = await Store.open(tmp_path / "s.db", bounds)
        await produce(store, [result(i, "r", 0, size=300) for i in range(10)])
        kept = [row.id for row in await store.pending_outbox(100)]
        await store.close()
        return kept

    assert asyncio.run(scenario()) == ["r7", "r8", "r9"]
    assert read_drops(tmp_path / "s.db") == {"r": 7}


def test_refuse_input_policy_raises_outbox_full_and_keeps_what_was_acked(tmp_path: Path) -> None:
    """With refuse_input and room for 3 rows, the 4th batch is refused (not acked) and nothing
    already stored is dropped; once a row is delivered, input is accepted again."""
    bounds = StoreSection(max_outbox_rows=3, when_full="refuse_input")

    async def scenario() -> None:
        store = await Store.open(tmp_path / "s.db", bounds)
        await produce(store, [result(i, "r", 0) for i in range(3)])
        with pytest.raises(OutboxFull):
            await store.ingest([reading(99)], [])
        pending = await store.pending_outbox(10)
        assert [row.id for row in pending] == ["r0", "r1", "r2"]
        await store.mark_delivered([pending[0].seq])
        outcome = await store.ingest([reading(99)], [])
        assert outcome.accepted == 1
        await store.close()

    asyncio.run(scenario())
    assert read_drops(tmp_path / "s.db") == {}


def test_full_database_refuses_the_batch_keeps_everything_committed_and_recovers(
    tmp_path: Path,
) -> None:
    """With PRAGMA max_page_count the database fills: the failing batch raises StoreFull and
    leaves no partial rows, every earlier reading is intact, and once rows are deleted the same
    connection accepts input again; integrity_check is ok."""
    bounds = StoreSection(max_page_count=40, reserve_bytes=0)

    async def scenario() -> tuple[int, int, list[str]]:
        store = await Store.open(tmp_path / "s.db", bounds)
        committed = 0
        full: StoreFull | None = None
        for batch in range(1000):
            try:
                await store.ingest([reading(batch * 10 + k, size=400) for k in range(10)], [])
            except StoreFull as exc:
                full = exc
                break
            committed += 10
        assert full is not None, "the database never filled"
        assert (await store.depths())["inbox"] == committed
        # Space returns: the pipeline moves readings out (here: they go to the outbox and the
        # uplink retires them).
        for _ in range(committed // 2):
            leased = await store.lease()
            assert leased is not None
            await store.complete(leased.id, result(0, leased.id, 0, size=10))
        pending = await store.pending_outbox(committed)
        await store.mark_delivered([row.seq for row in pending])
        after = await store.ingest([reading(100_000, size=400)], [])
        check = await store.integrity_check()
        await store.close()
        return committed, after.accepted, check

    committed, accepted_after, check = asyncio.run(scenario())
    assert committed > 0
    assert accepted_after == 1
    assert check == ["ok"]
    counts = read_counts(tmp_path / "s.db")
    assert counts["inbox"] == committed - committed // 2 + 1
    assert counts["delivered"] == committed // 2


def test_ingest_is_refused_below_the_reserve_while_results_can_still_be_recorded(
    tmp_path: Path,
) -> None:
    """With 40 pages and a 10-page reserve, ingest is refused (StoreFull) once fewer than 10
    pages are free, and the pipeline can still turn every waiting reading into a result in the
    room the reserve kept: a store full of readings cannot deadlock."""
    bounds = StoreSection(max_page_count=40, reserve_bytes=10 * 4096)

    async def scenario() -> int:
        store = await Store.open(tmp_path / "s.db", bounds)
        committed = 0
        refusal = ""
        while not refusal:
            try:
                await store.ingest([reading(committed, size=400)], [])
            except StoreFull as exc:
                refusal = str(exc)
            else:
                committed += 1
        assert "reserve" in refusal
        while (leased := await store.lease()) is not None:
            await store.complete(leased.id, result(0, leased.id, 0, size=600))
        counts = await store.depths()
        await store.close()
        return committed if counts["outbox"] == committed and counts["inbox"] == 0 else -1

    assert asyncio.run(scenario()) > 0


def test_a_result_takes_the_spent_drain_reserve_again_when_nothing_else_would(
    tmp_path: Path,
) -> None:
    """Results fill the store (40 pages) until one is refused and the drain reserve is spent.
    Once the cloud has taken every result the outbox is empty and no input comes: the reading in
    hand is still recorded, taking the reserve again (the filesystem has room for it). Before,
    only input took it again, and the reading waited for ever (seen with readings leased
    together, issue 16)."""
    bounds = StoreSection(max_page_count=40, reserve_bytes=4 * 4096)
    db = tmp_path / "s.db"

    async def scenario() -> tuple[bool, bool, int]:
        store = await Store.open(db, bounds)
        n = 0
        while True:
            try:
                await store.ingest([reading(n, size=200)], [])
            except StoreFull:
                break
            n += 1
        refused: Reading | None = None
        while (leased := await store.lease()) is not None:
            try:
                await store.complete(leased.id, result(n, leased.id, 0, size=1500))
            except StoreFull:
                refused = leased
                break
        assert refused is not None, "the results never filled the store"
        spent = not reserve_path(db).exists()
        pending = await store.pending_outbox(10_000)
        await store.mark_delivered([row.seq for row in pending])
        await store.complete(refused.id, result(n, refused.id, 0, size=1500))
        taken = reserve_path(db).exists()
        outbox = (await store.depths())["outbox"]
        await store.close()
        return spent, taken, outbox

    spent, taken, outbox = asyncio.run(scenario())
    assert spent, "the full store never spent its drain reserve"
    assert taken
    assert outbox == 1


@pytest.mark.parametrize(("offset", "what"), [(0, "header"), (4096 * 2, "a b-tree page")])
def test_corrupt_database_at_open_is_quarantined_and_a_fresh_store_starts(
    tmp_path: Path, offset: int, what: str
) -> None:
    """Bytes flipped in a stopped store's file (its header, or a b-tree page) fail quick_check
    at the next open: the file moves to quarantine/ under the state directory, the store opens
    empty and works, and the quarantined file keeps the damaged bytes for an operator."""
    path = tmp_path / "agent.db"

    async def fill() -> None:
        store = await Store.open(path)
        await store.ingest([reading(i, size=2000) for i in range(20)], [])
        await store.close()

    asyncio.run(fill())
    assert not path.with_name("agent.db-wal").exists(), "the WAL was not checkpointed at close"
    original_size = path.stat().st_size
    flip_bytes(path, offset)

    async def reopen() -> tuple[Store, dict[str, int], list[str]]:
        store = await Store.open(path)
        await store.ingest([reading(1)], [])
        depths = await store.depths()
        check = await store.integrity_check()
        await store.close()
        return store, depths, check

    store, depths, check = asyncio.run(reopen())
    assert store.quarantined is not None, f"damage to {what} was not detected"
    assert depths["inbox"] == 1
    assert check == ["ok"]
    moved = store.quarantined.directory / "agent.db"
    assert moved.parent.parent == tmp_path / "quarantine"
    assert moved.stat().st_size == original_size
    assert _quick_check_rows(moved) != [("ok",)]


def _quick_check_rows(path: Path) -> list[tuple[str]] | str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    finally:
        conn.close()


def test_a_sound_database_is_not_quarantined(tmp_path: Path) -> None:
    """quick_check passes on a sound store: it is reopened in place with its rows."""
    path = tmp_path / "agent.db"

    async def scenario() -> tuple[Store, int]:
        store = await Store.open(path)
        await store.ingest([reading(1)], [])
        await store.close()
        again = await Store.open(path)
        inbox = (await again.depths())["inbox"]
        await again.close()
        return again, inbox

    store, inbox = asyncio.run(scenario())
    assert store.quarantined is None
    assert inbox == 1
    assert not (tmp_path / "quarantine").exists()


def test_ttl_drops_old_results_of_its_route_only_and_counts_them(tmp_path: Path) -> None:
    """Results of a route with a 0.3 s TTL are expired after 0.5 s and counted as `t/ttl`;
    a fresh result of that route and an old one of a route without TTL stay."""

    async def scenario() -> tuple[dict[str, int], list[str]]:
        store = await Store.open(tmp_path / "s.db")
        await produce(store, [result(0, "t", 0), result(1, "keep", 0)])
        await asyncio.sleep(0.5)
        await produce(store, [result(2, "t", 0)])
        expired = await store.expire({"t": 0.3})
        kept = [row.id for row in await store.pending_outbox(10)]
        await store.close()
        return expired, kept

    expired, kept = asyncio.run(scenario())
    assert expired == {"t/ttl": 1}
    assert kept == ["keep1", "t2"]
    assert read_drops(tmp_path / "s.db") == {"t/ttl": 1}


def test_ttl_age_carries_across_a_reboot_and_ignores_the_downtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row 0.4 s old when the store last saw the clock keeps that age after a reboot (a new
    boot id, a monotonic clock that starts again near 0): with a 0.3 s TTL it expires, with 1 s
    it does not. Without the carry its age would be negative (never expiring); with a wall
    clock it would depend on the downtime."""
    import time

    from agent.store import schema

    path = tmp_path / "s.db"
    t0 = time.monotonic()

    def boot(boot_id: str, uptime_s: float) -> None:
        monkeypatch.setattr(schema, "boot_id", lambda: boot_id)
        start = time.monotonic()
        monkeypatch.setattr(schema, "monotonic",
                            lambda: uptime_s + time.monotonic() - start)

    boot("boot-a", 5000.0)

    async def before_reboot() -> None:
        store = await Store.open(path)
        await produce(store, [result(0, "t", 0)])
        await asyncio.sleep(0.4)
        await store.expire({"t": 100.0})  # the last monotonic time seen in boot-a
        await store.close()

    asyncio.run(before_reboot())
    boot("boot-b", 0.05)

    async def after_reboot() -> tuple[dict[str, int], dict[str, int]]:
        store = await Store.open(path)
        long_ttl = await store.expire({"t": 1.0})
        short_ttl = await store.expire({"t": 0.3})
        await store.close()
        return long_ttl, short_ttl

    long_ttl, short_ttl = asyncio.run(after_reboot())
    assert time.monotonic() - t0 < 5, "the test ran too slowly to mean anything"
    assert long_ttl == {}, "the row aged by more than the time the gateway ran"
    assert short_ttl == {"t/ttl": 1}, "the age before the reboot was forgotten"
