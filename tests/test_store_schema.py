"""The store's schema and its upgrades on real files: a store an older agent made opens with its
rows and gains the columns, indexes and triggers of a new one; a start costs the same whatever
the backlog; the writer's periodic reads never look at the schema; seqs are never reused; the
read-only views read an older file as it is and name what they cannot read."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
from sqlite_utils.plugins import pm

from agent.base.errors import StoreUnreadable
from agent.base.records import NewOutboxRow, Reading
from agent.store import views
from agent.store.schema import Transaction, connect, open_schema
from agent.store.writer import Store

# The CREATE statements of agent/storeschema.py at 136610b (the last commit before the schema
# was made through sqlite-utils), copied as they were. Its outbox has no `route` and no
# `created_mono`: that version's open added them with ALTER TABLE.
SCHEMA_136610B = """
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
SIZE_TRIGGERS_136610B = """
CREATE TRIGGER IF NOT EXISTS {table}_added AFTER INSERT ON {table} BEGIN
    UPDATE sizes SET rows = rows + 1, bytes = bytes + length(NEW.payload)
    WHERE name = '{table}';
END;
CREATE TRIGGER IF NOT EXISTS {table}_removed AFTER DELETE ON {table} BEGIN
    UPDATE sizes SET rows = rows - 1, bytes = bytes - length(OLD.payload)
    WHERE name = '{table}';
END;
"""
# The first store (the walking skeleton, 0fce450) had the same first four tables and nothing
# else: no sizes, drops, clock or last_reading, no triggers.
SCHEMA_0FCE450 = SCHEMA_136610B[:SCHEMA_136610B.index("CREATE TABLE IF NOT EXISTS drops")]

# The store of f050f4e (the last before the history of answered readings): 136610b's, with
# the outbox's `route` and `created_mono` and its two indexes, as that agent's open made them.
SCHEMA_F050F4E = SCHEMA_136610B.replace(
    "    created_at REAL NOT NULL,\n    UNIQUE (kind, id)",
    "    created_at REAL NOT NULL,\n    route TEXT NOT NULL DEFAULT '',\n"
    "    created_mono REAL NOT NULL DEFAULT 0,\n    UNIQUE (kind, id)") + """
CREATE INDEX outbox_victims ON outbox (priority, seq);
CREATE INDEX outbox_age ON outbox (route, created_mono);
"""

OLD_SCHEMAS = {
    "136610b": SCHEMA_136610B + "".join(SIZE_TRIGGERS_136610B.format(table=t)
                                        for t in ("inbox", "outbox", "dead_letter")),
    "0fce450": SCHEMA_0FCE450,
    "f050f4e": SCHEMA_F050F4E + "".join(SIZE_TRIGGERS_136610B.format(table=t)
                                        for t in ("inbox", "outbox", "dead_letter")),
}


def old_store(path: Path, schema: str) -> None:
    """A store made with an older agent's CREATE statements, holding rows of every kind: three
    readings (one leased by the process that made it), two results, a dead letter and its
    report, and five deliveries counted."""
    conn = sqlite3.connect(path)
    with conn:
        conn.executescript(schema)
        conn.executemany(
            "INSERT INTO inbox (id, topic, payload, route, priority, received_at, attempts, "
            "leased) VALUES (?, 'sensors/a/t', ?, 't', ?, 1.0, ?, ?)",
            [("in1", b'{"c": 1}', 0, 0, 0), ("in2", b'{"c": 22}', 5, 1, 1),
             ("in3", b'{"c": 333}', 0, 0, 0)])
        conn.executemany(
            "INSERT INTO outbox (id, kind, topic, payload, priority, created_at) "
            "VALUES (?, ?, ?, ?, 0, 2.0)",
            [("r1", "result", "edge/gw/results/t", b'{"level": "normal"}'),
             ("r2", "result", "edge/gw/results/t", b'{"level": "warning"}'),
             ("bad1", "dead_letter", "edge/gw/dead_letters", b'{"reason": "not UTF-8"}')])
        conn.execute(
            "INSERT INTO dead_letter (id, topic, payload, reason, received_at, created_at) "
            "VALUES ('bad1', 'sensors/a/t', x'ff', 'not UTF-8', 1.0, 1.5)")
        conn.execute("INSERT INTO counters (name, value) VALUES ('delivered', 5)")
    conn.close()


def new_store(path: Path) -> None:
    async def make() -> None:
        await (await Store.open(path)).close()

    asyncio.run(make())


def shape(path: Path) -> dict[str, Any]:
    """Every table's columns (name, type, NOT NULL, default, primary key), every index's
    columns with their order, and every trigger's SQL."""
    conn = sqlite3.connect(path)
    try:
        found: dict[str, Any] = {}
        for kind, name, sql in conn.execute(
                "SELECT type, name, sql FROM sqlite_master ORDER BY type, name"):
            if kind == "table":
                found[name] = [tuple(c[1:]) for c in conn.execute(f"PRAGMA table_info({name})")]
            elif kind == "index":
                found[name] = [tuple(c[1:]) for c in conn.execute(f"PRAGMA index_xinfo({name})")]
            else:
                found[name] = sql
        return found
    finally:
        conn.close()


def true_sizes(path: Path) -> dict[str, tuple[int, int]]:
    conn = sqlite3.connect(path)
    try:
        return {table: tuple(conn.execute(
            f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM {table}").fetchone())
            for table in ("inbox", "outbox", "dead_letter")}
    finally:
        conn.close()


@pytest.mark.parametrize("made_by", list(OLD_SCHEMAS))
def test_a_store_made_by_an_older_agent_opens_with_its_rows_and_the_new_columns(
    tmp_path: Path, made_by: str
) -> None:
    """A store made with the CREATE statements of 136610b (or of the first store, 0fce450), with
    rows in it, opens with the new code: every row is still there, the outbox has `route` and
    `created_mono` (with their defaults on the old rows), every table, index and trigger is the
    same as a new store's, the sizes are counted right, and the store works on the old rows."""
    old, fresh = tmp_path / "old.db", tmp_path / "fresh.db"
    old_store(old, OLD_SCHEMAS[made_by])
    new_store(fresh)
    expected = true_sizes(old)
    # The operator's commands read the old file as it is, before the agent upgrades it.
    assert views.read_counts(old) == {
        "inbox": 3, "outbox": 3, "dead_letter": 1, "delivered": 5,
        **({"dropped": 0} if made_by != "0fce450" else {})}
    assert views.read_drops(old) == {}
    assert ("route" in [c[0] for c in shape(old)["outbox"]]) == (made_by == "f050f4e")
    assert "history" not in shape(old)
    if made_by == "f050f4e":  # queue export's reader: the outbox's results, no history
        with views.read_route(old) as reader:
            assert not reader.has_history
            assert [r.id for r in reader.results("")] == ["r1", "r2"]
            assert list(reader.history("")) == []

    async def scenario() -> dict[str, Any]:
        store = await Store.open(old)
        try:
            seen: dict[str, Any] = {"stats": await store.stats(),
                                    "pending": await store.pending_outbox(10)}
            seen["leases"] = [(await store.lease()) for _ in range(4)]
            seen["again"] = await store.ingest(
                [Reading("in1", "sensors/a/t", b'{"c": 1}', 9.0, "t", 0)], [])
            await store.complete("in2", NewOutboxRow("in2", "result", "edge/gw/results/t",
                                                     b"{}", 0, "t"))
            # An ok result of one reading goes to the history the upgrade made.
            await store.complete("in1", NewOutboxRow(
                "in1", "result", "edge/gw/results/t",
                b'{"id":"in1","status":"ok","output":{"level":"normal"},"source":{"topic":'
                b'"sensors/a/t","received_at":1.0,"payload":{"c":1}},"model":{"name":"m",'
                b'"version":"1"},"executor":"local"}', 0, "t"))
            await store.mark_delivered([seen["pending"][0].seq])
            seen["after"] = await store.stats()
            return seen
        finally:
            await store.close()

    seen = asyncio.run(scenario())
    assert (seen["stats"].inbox, seen["stats"].inbox_bytes) == expected["inbox"]
    assert (seen["stats"].outbox, seen["stats"].outbox_bytes) == expected["outbox"]
    assert seen["stats"].dead_letter == expected["dead_letter"][0] == 1
    assert seen["stats"].delivered == 5
    assert [(r.id, r.kind, r.payload) for r in seen["pending"]] == [
        ("r1", "result", b'{"level": "normal"}'), ("r2", "result", b'{"level": "warning"}'),
        ("bad1", "dead_letter", b'{"reason": "not UTF-8"}')]
    # The old process's lease is void: all three readings are leased again, priority first,
    # and the one it had leased counts a second attempt.
    leased = [(r.id, r.attempts) for r in seen["leases"] if r is not None]
    assert leased == [("in2", 2), ("in1", 1), ("in3", 1)]
    assert seen["leases"][3] is None
    assert (seen["again"].accepted, seen["again"].duplicates) == (0, 1)
    assert (seen["after"].inbox, seen["after"].outbox, seen["after"].delivered) == (1, 4, 6)

    assert shape(old) == shape(fresh)
    conn = sqlite3.connect(old)
    try:
        rows = conn.execute("SELECT id, route, created_mono FROM outbox ORDER BY seq").fetchall()
        sizes = {name: (rows_, size) for name, rows_, size
                 in conn.execute("SELECT name, rows, bytes FROM sizes")}
        history = conn.execute("SELECT id, route, reading, output FROM history").fetchall()
    finally:
        conn.close()
    assert rows[:3] == [("r2", "", 0.0), ("bad1", "", 0.0), ("in2", "t", rows[2][2])]
    assert rows[2][2] > 0.0
    assert rows[3][:2] == ("in1", "t")
    assert sizes == true_sizes(old)
    assert history == [("in1", "t", '{"c":1}', '{"level":"normal"}')]
    with views.read_route(old) as reader:  # the outbox's copy of in1 is left to the history
        assert [r.id for r in reader.results("t")] == ["in2"]
        assert [r.id for r in reader.history("t")] == ["in1"]


def vm_steps(path: Path, run: Callable[[sqlite3.Connection], object]) -> int:
    """SQLite virtual-machine steps (in units of 100) that `run` took on the writer's kind of
    connection (agent/store/schema.py connect)."""
    conn = connect(path)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    try:
        conn.set_progress_handler(count, 100)
        run(conn)
    finally:
        conn.close()
    return steps


def test_a_start_takes_the_same_steps_with_40_rows_waiting_and_with_40_000(
    tmp_path: Path
) -> None:
    """Opening a store (schema, upgrades, the carried clock, freeing leases) does not count the
    backlog: the size triggers keep `sizes` from the store's first start on. Dead letters are
    never deleted, so a count of them at every start grew without bound."""
    steps = {}
    for n in (20, 20_000):
        path = tmp_path / f"{n}.db"
        new_store(path)
        conn = sqlite3.connect(path)
        with conn:
            conn.executemany(
                "INSERT INTO inbox (id, topic, payload, route, priority, received_at) "
                "VALUES (?, 't', ?, 't', 0, 0)", ((f"in{i}", b"x" * 100) for i in range(n)))
            conn.executemany(
                "INSERT INTO dead_letter (id, topic, payload, reason, received_at, created_at) "
                "VALUES (?, 't', ?, 'bad', 0, 0)", ((f"dl{i}", b"x" * 100) for i in range(n)))
        conn.close()
        steps[n] = vm_steps(path, open_schema)
        assert true_sizes(path)["dead_letter"] == (n, n * 100)
        assert views.read_stats(path).dead_letter == n
    assert steps[20_000] <= steps[20] + 2, f"{steps[20]} steps at 40 rows, {steps[20_000]} at 40k"


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


def test_a_transaction_takes_the_write_lock_at_begin_and_cannot_nest(tmp_path: Path) -> None:
    """Transaction is BEGIN IMMEDIATE: another connection cannot begin a write while one is
    open, before it has run a statement; a Transaction inside another is an error that rolls the
    outer one back, never a savepoint that would end without a commit."""
    path = tmp_path / "s.db"
    conn = connect(path)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        open_schema(conn)
        with Transaction(conn), pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")

        def nested() -> None:
            with Transaction(conn):
                conn.execute("INSERT INTO counters (name, value) VALUES ('x', 1)")
                with Transaction(conn):
                    conn.execute("UPDATE counters SET value = 2 WHERE name = 'x'")

        with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
            nested()
        assert not conn.in_transaction
        assert conn.execute("SELECT count(*) FROM counters WHERE name = 'x'").fetchone()[0] == 0
    finally:
        other.close()
        conn.close()


def test_an_outbox_seq_is_never_given_twice(tmp_path: Path) -> None:
    """After the newest row is delivered, the next row gets a larger seq (AUTOINCREMENT, the
    reason the outbox's CREATE stays hand-written): the uplink's after_seq cursor cannot skip
    it and a late PUBACK for the old seq cannot delete it."""

    async def scenario() -> tuple[int, int]:
        store = await Store.open(tmp_path / "s.db")
        try:
            await store.enqueue(NewOutboxRow("a", "result", "edge/gw/results/t", b"{}", 0, "t"))
            first = (await store.pending_outbox(10))[0].seq
            await store.mark_delivered([first])
            await store.enqueue(NewOutboxRow("b", "result", "edge/gw/results/t", b"{}", 0, "t"))
            return first, (await store.pending_outbox(10))[0].seq
        finally:
            await store.close()

    first, second = asyncio.run(scenario())
    assert second > first


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


class RecordingPlugin:
    """A sqlite-utils plugin that notes every connection it is given."""

    def __init__(self) -> None:
        self.connections: list[sqlite3.Connection] = []

    @sqlite_utils.hookimpl
    def prepare_connection(self, conn: sqlite3.Connection) -> None:
        self.connections.append(conn)


def test_no_sqlite_utils_plugin_runs_on_the_store_s_connections(tmp_path: Path) -> None:
    """A sqlite-utils plugin installed beside the agent is not given the writer's connection
    nor a read-only view's (it is given a plain sqlite_utils.Database's: the control)."""
    plugin = RecordingPlugin()
    pm.register(plugin, name="recording")
    try:
        new_store(tmp_path / "s.db")
        views.read_counts(tmp_path / "s.db")
        views.read_dead_letters(tmp_path / "s.db")
        assert plugin.connections == []
        control = sqlite3.connect(":memory:")
        sqlite_utils.Database(control)
        assert plugin.connections == [control]
        control.close()
    finally:
        pm.unregister(name="recording")
