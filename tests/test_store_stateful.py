"""A hypothesis state machine drives the real store (real SQLite files, the writer thread) through
random ingests, leases, releases, completions, PUBACKs and restarts, and checks after every step:
an acked reading is never lost (it is in the inbox, in the outbox, delivered, or counted as
dropped at the outbox bound); a row whose PUBACK was recorded is never offered for sending again;
a lease is held by one taker until it is released, completed or expires with the process (a
restart), and is then leased again."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.base.records import NewOutboxRow, Reading
from agent.config.settings import StoreSection
from agent.store.writer import Store

IDS = st.integers(min_value=0, max_value=24)


def reading(i: int) -> Reading:
    return Reading(f"r{i}", "sensors/a/t", b'{"i": %d}' % i, 1.0, "t", i % 3)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="store-sm-"))
        self.path = self.dir / "agent.db"
        self.loop = asyncio.new_event_loop()
        # A small bound so that drops happen and are accounted for.
        self.bounds = StoreSection(max_outbox_rows=4, reserve_bytes=0)
        self.store = self.run(Store.open(self.path, self.bounds))
        self.acked: set[str] = set()
        self.leased: set[str] = set()
        self.delivered_seqs: set[int] = set()
        self.delivered_ids: set[str] = set()

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _rows(self, sql: str) -> list[tuple[object, ...]]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    # -- rules -------------------------------------------------------------------------------

    @rule(ids=st.lists(IDS, min_size=1, max_size=8))
    def ingest(self, ids: list[int]) -> None:
        self.run(self.store.ingest([reading(i) for i in ids], []))
        self.acked |= {f"r{i}" for i in ids}  # the batch committed: the caller acks it now

    @rule()
    def lease(self) -> None:
        got = self.run(self.store.lease())
        if got is None:
            free = self._rows("SELECT id FROM inbox WHERE leased = 0")
            assert free == [], f"lease found nothing while {free} were free"
            return
        assert got.id not in self.leased, f"{got.id} leased twice"
        self.leased.add(got.id)

    @precondition(lambda self: bool(self.leased))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.leased)))
        row = NewOutboxRow(rid, "result", "edge/gw/results/t", b"{}", int(rid[1:]) % 3, "t")
        self.run(self.store.complete(rid, row))
        self.leased.discard(rid)

    @rule()
    def lease_and_complete(self) -> None:
        """The pipeline's usual step: the next reading becomes a result."""
        got = self.run(self.store.lease())
        if got is not None:
            assert got.id not in self.leased, f"{got.id} leased twice"
            row = NewOutboxRow(got.id, "result", "edge/gw/results/t", b"{}", got.priority, "t")
            self.run(self.store.complete(got.id, row))

    @precondition(lambda self: bool(self.leased))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.leased)))
        self.run(self.store.release(rid))
        self.leased.discard(rid)

    @rule(data=st.data(), window=st.integers(min_value=1, max_value=8))
    def send_and_get_some_pubacks(self, data: st.DataObject, window: int) -> None:
        rows = self.run(self.store.pending_outbox(window))
        for row in rows:
            assert row.seq not in self.delivered_seqs, f"{row.id} offered again after PUBACK"
        acked = data.draw(st.lists(st.sampled_from(rows), unique_by=lambda r: r.seq)) \
            if rows else []
        self.run(self.store.mark_delivered([row.seq for row in acked]))
        self.delivered_seqs |= {row.seq for row in acked}
        self.delivered_ids |= {row.id for row in acked}

    @rule()
    def restart(self) -> None:
        """The process ends (its leases expire with it) and a new one opens the same file."""
        self.run(self.store.close())
        self.store = self.run(Store.open(self.path, self.bounds))
        self.leased.clear()

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def acked_readings_are_never_lost(self) -> None:
        inbox = {str(r[0]) for r in self._rows("SELECT id FROM inbox")}
        outbox = {str(r[0]) for r in self._rows("SELECT id FROM outbox")}
        dropped = int(self._rows("SELECT coalesce(sum(dropped), 0) FROM drops")[0][0])
        missing = self.acked - inbox - outbox - self.delivered_ids
        assert len(missing) <= dropped, f"lost without a count: {sorted(missing)}"

    @invariant()
    def leases_in_the_store_are_the_ones_handed_out(self) -> None:
        held = {str(r[0]) for r in self._rows("SELECT id FROM inbox WHERE leased = 1")}
        assert held == self.leased

    @invariant()
    def the_outbox_stays_within_its_bound(self) -> None:
        rows = int(self._rows("SELECT count(*) FROM outbox WHERE kind != 'drops'")[0][0])
        assert rows <= self.bounds.max_outbox_rows


StoreMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_store_state_machine = StoreMachine.TestCase
