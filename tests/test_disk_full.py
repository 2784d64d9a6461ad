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

from agent.config import StoreSection
from agent.errors import StoreFull
from agent.records import NewOutboxRow, Reading
from agent.store import Store
from agent.storereserve import free_bytes, reserve_path
from agent.storeviews import read_counts
from tests.conftest import Rig
from tools.harness import CloudCollector, publish_readings, wait_until

FS_BYTES = 8 * 1024 * 1024


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
    """On an 8 MB filesystem, readings and results fill the store until neither more input nor
    another result fits (0 bytes free); the delete of delivered rows still commits by spending
    the drain reserve, input stays refused until the deletes have made room for both reserves,
    and the database passes integrity_check."""
    bounds = StoreSection(reserve_bytes=512 * 1024, drain_reserve_bytes=1024 * 1024)
    path = small_fs / "agent.db"

    async def scenario() -> tuple[int, int, int, bool, StoreFull | None, StoreFull | None]:
        store = await Store.open(path, bounds)
        try:
            assert reserve_path(path).stat().st_size == bounds.drain_reserve_bytes
            taken, done = await fill(store)
            free_when_full = free_bytes(small_fs)
            refused = await store.input_refusal()
            delivered = 0
            while True:
                rows = await store.pending_outbox(200)
                if not rows:
                    break
                await store.mark_delivered([row.seq for row in rows])
                delivered += len(rows)
            reserve_left = reserve_path(path).exists()
            after = await store.input_refusal()
            assert await store.integrity_check() == ["ok"]
            print(f"filled: readings={taken} results={done} free={free_when_full} "
                  f"delivered={delivered} refused={refused} after={after}")
            return taken, done, free_when_full, reserve_left, refused, after
        finally:
            await store.close()

    taken, done, free_when_full, reserve_left, refused, after = asyncio.run(scenario())
    assert done > 0 and taken > done
    assert free_when_full < 64 * 1024, f"the filesystem never filled ({free_when_full} free)"
    assert refused is not None, "input was taken on a full store"
    assert not reserve_left, "the deletes never needed the reserve: the disk was not full"
    assert after is None, "input still refused after every result was delivered"
    counts = read_counts(path)
    assert counts["outbox"] == 0 and counts["delivered"] == done
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
            wal_before = os.path.getsize(f"{path}-wal")
            refusal = await store.input_refusal()
            return wal_before, os.path.getsize(f"{path}-wal"), refusal
        finally:
            await store.close()

    wal_before, wal_after, refusal = asyncio.run(scenario())
    assert refusal is not None
    assert wal_before > 0 and wal_after == 0, (wal_before, wal_after)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
