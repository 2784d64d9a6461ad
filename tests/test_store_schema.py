"""The store's read paths and its schema on real files: the writer's periodic reads never look
at the schema; the read-only views name what they cannot read."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.base.errors import StoreUnreadable
from agent.base.records import Reading
from agent.store import views
from agent.store.writer import Store


def test_the_status_sample_and_the_depths_never_read_the_schema(tmp_path: Path) -> None:
    """The 2-s sampler (stats) and the offload policy's depth (depths) run on the writer's
    connection to a store it opened: they read `sizes` and the counters, never sqlite_master."""

    async def scenario() -> list[str]:
        store = await Store.open(tmp_path / "s.db")
        statements: list[str] = []
        try:
            await store.ingest([Reading("a", "sensors/a/t", b"{}", 1.0, "t", 0)], [])
            await store._call(lambda conn: conn.set_trace_callback(statements.append))
            stats, depths = await store.stats(), await store.depths()
            await store._call(lambda conn: conn.set_trace_callback(None))
        finally:
            await store.close()
        assert (stats.inbox, depths["inbox"], depths["dropped"]) == (1, 1, 0)
        return statements

    statements = asyncio.run(scenario())
    assert statements, "the trace saw nothing"
    assert not [s for s in statements if "sqlite_master" in s.lower()], statements


@pytest.mark.parametrize("read", [views.read_counts, views.read_stats, views.read_drops,
                                  views.read_dead_letters,
                                  lambda path: views.read_oldest(path, "inbox")])
def test_a_read_only_view_of_a_file_that_is_not_a_store_raises_store_unreadable(
    tmp_path: Path, read: Callable[[Path], object]
) -> None:
    """Every read-only view names the file and SQLite's error (here SQLITE_NOTADB) in
    StoreUnreadable, which the operator's commands print; no sqlite3 error escapes them."""
    junk = tmp_path / "agent.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreUnreadable, match="SQLITE_NOTADB"):
        read(junk)
    with pytest.raises(StoreUnreadable, match="no store at"):
        read(tmp_path / "missing.db")
