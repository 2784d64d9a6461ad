"""A full disk on a real small filesystem (an 8 MB tmpfs mounted for the test): the store's drain
reserve, and the whole agent filled during a cloud outage, killed, restarted on the full disk and
drained when the cloud returns."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.base.errors import StoreFull
from agent.base.records import NewOutboxRow, Reading, reading_id
from agent.config.settings import StoreSection
from agent.store.reserve import free_bytes, reserve_path
from agent.store.views import read_counts
from agent.store.writer import Store
from tests.conftest import Rig
from tests.harness import CloudCollector, publish_readings, wait_until, write_agent_config

FS_BYTES = 8 * 1024 * 1024
DRAIN_RESERVE = 512 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB tmpfs, unmounted at teardown whatever the test did."""
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs",
                           str(mount_point)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        # Lazy: an agent killed a moment ago may still hold a file open.
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def reading(i: int) -> Reading:
    payload = json.dumps({"seq": i, "celsius": 20, "note": "x" * 100}).encode()
    return Reading(f"r{i}", "sensors/a/temperature", payload, time.time(), "t", 0)


def result(reading_id: str) -> NewOutboxRow:
    return NewOutboxRow(reading_id, "result", "edge/gw/results/t", b"y" * 400, 0, "t")


async def fill(store: Store) -> tuple[int, int]:
    """Ingest readings and turn half of them into results until the store refuses both; the
    count of readings taken and of results committed."""
    taken = done = 0
    input_full = False
    while True:
        if not input_full:
            try:
                outcome = await store.ingest([reading(taken + k) for k in range(50)], [])
                taken += outcome.accepted
            except StoreFull:
                input_full = True
        leased = await store.lease()
        if leased is None:
            return taken, done
        try:
            await store.complete(leased.id, result(leased.id))
            done += 1
        except StoreFull:
            if input_full:
                return taken, done


def test_a_store_filled_to_the_last_byte_still_deletes_delivered_rows_and_takes_input_again(
    small_fs: Path,
) -> None:
    """On an 8 MB filesystem, readings and results fill the store until SQLite reports it full,
    which spends the drain reserve; results stop at half of it. The deletes of the delivered
    results still commit, input stays refused until they have made room for both reserves, and
    the database passes integrity_check."""
    bounds = StoreSection(reserve_bytes=512 * 1024, drain_reserve_bytes=1024 * 1024)
    path = small_fs / "agent.db"

    async def scenario() -> tuple[int, int, int, bool, StoreFull | None, StoreFull | None]:
        store = await Store.open(path, bounds)
        try:
            assert reserve_path(path).stat().st_size == bounds.drain_reserve_bytes
            taken, done = await fill(store)
            free_when_full = free_bytes(small_fs)
            spent = not reserve_path(path).exists()
            refused = await store.input_refusal()
            delivered = 0
            while True:
                rows = await store.pending_outbox(200)
                if not rows:
                    break
                await store.mark_delivered([row.seq for row in rows])
                delivered += len(rows)
            after = await store.input_refusal()
            assert await store.integrity_check() == ["ok"]
            print(f"filled: readings={taken} results={done} free={free_when_full} "
                  f"delivered={delivered} refused={refused} after={after}")
            return taken, done, free_when_full, spent, refused, after
        finally:
            await store.close()

    taken, done, free_when_full, spent, refused, after = asyncio.run(scenario())
    assert done > 0
    assert taken > done
    assert spent, "the filesystem never filled: the drain reserve was not needed"
    assert free_when_full <= bounds.drain_reserve_bytes, f"{free_when_full} bytes free when full"
    assert refused is not None, "input was taken on a full store"
    assert after is None, "input still refused after every result was delivered"
    counts = read_counts(path)
    assert counts["outbox"] == 0
    assert counts["delivered"] == done
    assert counts["inbox"] == taken - done


def test_input_refusal_folds_the_wal_before_it_refuses(small_fs: Path) -> None:
    """The WAL is room too: after a burst, the store asked whether it takes input below its
    threshold first truncates the WAL (its file is gone), so the threshold counts that room."""
    bounds = StoreSection(reserve_bytes=FS_BYTES, drain_reserve_bytes=0)
    path = small_fs / "agent.db"

    async def scenario() -> tuple[int, int, StoreFull | None]:
        store = await Store.open(path, StoreSection(drain_reserve_bytes=0, reserve_bytes=0))
        await store.ingest([reading(i) for i in range(2000)], [])
        await store.close()
        store = await Store.open(path, bounds)
        try:
            # A write after the open leaves frames in the WAL, as a running agent does.
            leased = await store.lease()
            assert leased is not None
            wal_before = await asyncio.to_thread(os.path.getsize, f"{path}-wal")
            refusal = await store.input_refusal()
            return wal_before, await asyncio.to_thread(os.path.getsize, f"{path}-wal"), refusal
        finally:
            await store.close()

    wal_before, wal_after, refusal = asyncio.run(scenario())
    assert refusal is not None
    assert wal_before > 0
    assert wal_after == 0, f"the WAL kept {wal_after} of {wal_before} bytes"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_agent_filled_during_an_outage_killed_and_restarted_on_the_full_disk_drains_everything(
    rig: Rig, small_fs: Path,
) -> None:
    """State dir on an 8 MB tmpfs (mostly taken by another file), cloud down: 1,400 readings
    fill the store until ingest pauses and results no longer fit. The agent is SIGKILLed and
    restarted on the full disk, then the cloud returns: every reading's result arrives, the
    agent never fails, paused ingest does not churn the local broker, the drain reserve is
    taken again from the emptied pages, and the database passes integrity_check."""
    count = 1400
    state = small_fs / "state"
    # Another tenant of the disk (logs, other services): the store gets about 1.1 MB of it.
    filler = small_fs / "other-files"
    with filler.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, FS_BYTES - 1100 * 1024)
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    rig.cloud.stop()
    config = write_agent_config(
        rig.workdir / "agent.toml", state_dir=state, model_path=rig.model,
        local_port=rig.local.port, cloud_port=rig.cloud.port,
        extra=f"[store]\nreserve_bytes = 131072\ndrain_reserve_bytes = {DRAIN_RESERVE}\n")
    published = [(f"sensors/s{i % 3}/temperature",
                  json.dumps({"seq": i, "celsius": 20, "note": "x" * 100}).encode())
                 for i in range(count)]
    ids = {reading_id("gw-test", topic, body) for topic, body in published}

    first = rig.agent(config)
    first.wait_for_event("agent_ready", 60)
    publish_readings(rig.local.port, published)
    paused = first.wait_for_event("ingest_paused", 120)
    # The pipeline goes on turning readings into results until they no longer fit either.
    wait_until(lambda: any(e.get("event") == "pipeline_store_failed" for e in first.events())
               or read_counts(state / "agent.db")["inbox"] == 0, 180,
               "results to fill the store (or every reading answered)")
    held = read_counts(state / "agent.db")
    free_at_kill = free_bytes(small_fs)
    wal_at_kill = os.path.getsize(state / "agent.db-wal")
    first.kill()

    second = rig.agent(config)
    second.wait_for_event("agent_ready", 60)
    rig.cloud.start()
    wait_until(lambda: collector.distinct_ids() >= ids, 300,
               f"all {count} results at the cloud")
    # Drained: the next reading's commit takes the reserve back from the emptied pages.
    extra = ("sensors/s0/temperature", b'{"seq": -1, "celsius": 21}')
    publish_readings(rig.local.port, [extra])
    wait_until(lambda: reading_id("gw-test", *extra) in collector.distinct_ids(), 60,
               "the result of a reading published after the drain")
    wait_until(lambda: reserve_path(state / "agent.db").exists(), 30, "the reserve taken again")
    events = second.events()
    names = [e.get("event") for e in events]
    reconnects = names.count("ingest_subscribed")
    # Reconnects while paused: each should come with room for the redelivered window (and so
    # end the pause), not on the link's 1-s backoff whether or not there is room.
    paused_now, pauses, while_paused = False, 0, 0
    for name in names:
        if name == "ingest_paused":
            paused_now, pauses = True, pauses + 1
        elif name == "ingest_resumed":
            paused_now = False
        elif name == "ingest_subscribed" and paused_now:
            while_paused += 1
    print(f"disk full: paused={paused['reason']!r} held={held} free_at_kill={free_at_kill} "
          f"wal_at_kill={wal_at_kill} reserve_released={names.count('store_reserve_released')} "
          f"ingest_subscribed_after_restart={reconnects} pauses={pauses} "
          f"reconnects_while_paused={while_paused} "
          f"delivered={len(collector.distinct_ids() & ids)}/{count}")
    assert held["inbox"] + held["outbox"] < count, "the store took every reading: never full"
    # What is free is the drain reserve, released when a lease met SQLITE_FULL.
    assert "store_reserve_released" in [e.get("event") for e in first.events()]
    assert free_at_kill <= DRAIN_RESERVE + 64 * 1024, f"{free_at_kill} bytes free at the kill"
    assert "agent_failed" not in [e.get("event") for e in first.events()] + names
    assert second.proc is not None
    assert second.proc.poll() is None, "the agent exited"
    assert while_paused <= 2 * pauses, (
        f"ingest reconnected {while_paused} times in {pauses} pauses while the store was full")
    assert second.terminate() == 0
    with sqlite3.connect(state / "agent.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    collector.stop()


def test_paused_ingest_stays_off_the_local_broker_while_the_store_stays_full(rig: Rig) -> None:
    """Database capped at 40 pages, cloud down, so the store stays full: after `ingest_paused`
    ingest does not reconnect to make the broker redeliver (before: every reconnect_max_s, 1 s
    here, 133 reconnects in 2 minutes) until room returns; in 6 s at most one reconnect."""
    rig.local.start()
    agent = rig.agent(rig.config(
        extra="[store]\nmax_page_count = 40\nreserve_bytes = 32768\ndrain_reserve_bytes = 0\n"))
    agent.wait_for_event("agent_ready")
    publish_readings(rig.local.port, [
        (f"sensors/s{i % 3}/temperature",
         json.dumps({"seq": i, "celsius": 20, "note": "x" * 100}).encode()) for i in range(400)])
    paused = agent.wait_for_event("ingest_paused", 60)
    since = [e for e in agent.events() if e.get("event") == "ingest_subscribed"]
    time.sleep(6.0)  # a negative: nothing to wait for but time (the old churn was time-driven)
    after = [e for e in agent.events() if e.get("event") == "ingest_subscribed"]
    print(f"paused: {paused['reason']!r}; reconnects in 6 s: {len(after) - len(since)}")
    assert len(after) - len(since) <= 1
    # Only meaningful while the store stayed full the whole time.
    assert not [e for e in agent.events() if e.get("event") == "ingest_resumed"
                and e["timestamp"] >= paused["timestamp"]], "ingest resumed: the store had room"
    assert agent.proc is not None
    assert agent.proc.poll() is None
