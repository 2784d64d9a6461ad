"""The history of answered readings on real SQLite files: written with the result in one
transaction (ok single-reading results only), kept after delivery, held to [store]
history_max_rows (also when the bound is lowered between runs), and the first thing the store
gives up when its room runs short, before input is refused or the drain reserve is spent."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
from pathlib import Path

from agent.base.errors import StoreFull
from agent.base.records import Answer, Completion, ModelInfo, Reading
from agent.config.settings import StoreSection
from agent.routing.outbound import Topics, result_row
from agent.store.reserve import reserve_path
from agent.store.writer import Store

MODEL = ModelInfo(name="tiny-test", version="3", sha256="ab" * 32, path="/m.gguf")
TOPICS = Topics("edge", "gw")


def answer(output: object, error: str | None = None) -> Answer:
    return Answer(output=output, error=error,
                  completion=Completion(json.dumps(output), 20, 6, "stop", 12.5),
                  model=MODEL, raw=None, executor="local", executor_reason=None)


def reading(i: int, note: int = 8) -> Reading:
    payload = json.dumps({"seq": i, "celsius": 20 + i % 50, "note": "x" * note}).encode()
    return Reading(f"id{i}", "sensors/a/temperature", payload, 1_700_000_000.0 + i, "t", 0)


async def answer_all(store: Store, readings: list[Reading], deliver: bool = True,
                     failed: bool = False) -> None:
    """Ingest, lease and complete each reading with an ok (or failed) result; then, as a
    connected uplink does, deliver and delete every queued row."""
    await store.ingest(readings, [])
    for _ in readings:
        leased = await store.lease()
        assert leased is not None
        a = answer(None, "bad output") if failed else answer({"level": "normal"})
        await store.complete(leased.id, result_row(TOPICS, leased,
                                                   json.loads(leased.payload), a, "v1"))
    while deliver:
        rows = await store.pending_outbox(500)
        if not rows:
            break
        await store.mark_delivered([row.seq for row in rows])


def history(path: Path) -> list[tuple[str, str, str, str, str, str]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT id, topic, output, model_name, model_version, executor "
                            "FROM history ORDER BY seq").fetchall()
    finally:
        conn.close()


def test_an_ok_result_is_kept_after_delivery_and_a_failed_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"

    async def scenario() -> None:
        store = await Store.open(path)
        try:
            await answer_all(store, [reading(i) for i in range(3)])
            await answer_all(store, [reading(i) for i in range(3, 5)], failed=True)
            assert (await store.stats()).outbox == 0
        finally:
            await store.close()

    asyncio.run(scenario())
    assert history(path) == [(f"id{i}", "sensors/a/temperature", '{"level":"normal"}',
                              "tiny-test", "3", "local") for i in range(3)]
    conn = sqlite3.connect(path)
    try:
        assert json.loads(conn.execute("SELECT reading FROM history WHERE id = 'id1'")
                          .fetchone()[0]) == json.loads(reading(1).payload)
        # Wall-clock time of the completion (as the outbox's created_at), not of the reading.
        assert conn.execute("SELECT count(*) FROM history WHERE created_at > 1.75e9"
                            ).fetchone()[0] == 3
    finally:
        conn.close()


def test_the_history_holds_at_most_history_max_rows_the_newest_and_a_lower_bound_prunes_at_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.db"

    async def run(bounds: StoreSection, first: int, count: int) -> list[int]:
        store = await Store.open(path, bounds)
        sizes: list[int] = []
        try:
            for start in range(first, first + count, 50):
                await answer_all(store, [reading(i) for i in range(start, start + 50)])
                sizes.append(len(history(path)))
        finally:
            await store.close()
        return sizes

    sizes = asyncio.run(run(StoreSection(history_max_rows=200), 0, 1000))
    assert max(sizes) <= 200
    assert sizes[-1] >= 200 - 25 + 1  # pruned every 25 rows (200 // 8) down to 176
    assert history(path)[-1][0] == "id999"
    assert [int(row[0][2:]) for row in history(path)] == list(range(1000 - sizes[-1], 1000))
    asyncio.run(run(StoreSection(history_max_rows=10), 1000, 50))
    assert [row[0] for row in history(path)] == [f"id{i}" for i in range(1040, 1050)]
    asyncio.run(run(StoreSection(history_max_rows=0), 2000, 50))
    assert history(path) == []


def test_history_yields_to_input_when_the_store_runs_short_of_room(tmp_path: Path) -> None:
    """A store capped at 2 MB (max_page_count) on a gateway whose uplink delivers everything:
    only the history grows. It is halved whenever the room falls under twice reserve_bytes,
    so input is never refused, where a history that took the room would stop ingest."""
    path = tmp_path / "agent.db"
    bounds = StoreSection(max_page_count=512, reserve_bytes=256 * 1024,
                          drain_reserve_bytes=0, history_max_rows=1_000_000)

    async def scenario() -> tuple[list[int], StoreFull | None]:
        store = await Store.open(path, bounds)
        sizes: list[int] = []
        try:
            for start in range(0, 1500, 50):
                await answer_all(store, [reading(i, note=2000) for i in range(start, start + 50)])
                sizes.append(len(history(path)))
            return sizes, await store.input_refusal()
        finally:
            await store.close()

    sizes, refusal = asyncio.run(scenario())
    assert refusal is None
    # The history took the room above the floor and then gave half of it back, more than once.
    assert max(sizes) < 1500
    assert sum(1 for a, b in itertools.pairwise(sizes) if b < a) >= 2, sizes
    assert sizes[-1] > 0
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def test_a_full_store_drops_the_history_before_it_refuses_input_or_spends_the_drain_reserve(
    tmp_path: Path,
) -> None:
    """No input reserve (reserve_bytes 0) and a 2 MB cap: the history fills the store until
    SQLite reports it full. The write that meets SQLITE_FULL deletes the history and commits;
    neither ingest nor a completion fails, and the drain reserve file stays where it was."""
    path = tmp_path / "agent.db"
    bounds = StoreSection(max_page_count=512, reserve_bytes=0, drain_reserve_bytes=64 * 1024,
                          history_max_rows=1_000_000)

    async def scenario() -> list[int]:
        store = await Store.open(path, bounds)
        sizes: list[int] = []
        try:
            assert reserve_path(path).exists()
            for start in range(0, 1500, 50):
                await answer_all(store, [reading(i, note=2000) for i in range(start, start + 50)])
                sizes.append(len(history(path)))
            assert await store.integrity_check() == ["ok"]
        finally:
            await store.close()
        return sizes

    sizes = asyncio.run(scenario())
    assert any(b < a for a, b in itertools.pairwise(sizes)), sizes
    assert reserve_path(path).stat().st_size == 64 * 1024
