"""History micro benchmark: what keeping the answered reading in `history` adds to each
completion (agent/store/transactions.py complete), on real SQLite files opened as the store
opens them (WAL, synchronous=FULL, agent/store/schema.py connect and open_schema).

Two stores, one with [store] history_max_rows at its default and one with 0, each given the
same readings and the agent's own result bodies (agent/routing/outbound.py result_row). The
completions run in turn, one on each store, so that a shared machine's load falls on both
alike; each is a lease and a complete as the pipeline makes them, and only the complete is
timed (wall and thread CPU). Then the bytes the history takes per row (its table and its
index, from the pages they use).

Usage: tools/bench_history.py [--readings N] [--dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.base.records import Answer, Completion, ModelInfo, Reading
from agent.config.settings import StoreSection
from agent.routing.outbound import Topics, result_row
from agent.store import transactions
from agent.store.schema import connect, open_schema

MODEL = ModelInfo(name="temperature-student", version="7", sha256="ab" * 32, path="/m.gguf")
TOPICS = Topics("edge", "gw-bench")


def readings(n: int) -> list[Reading]:
    """Readings shaped like the example configuration's temperature route's."""
    return [Reading(f"{i:08d}-{'ab' * 12}", f"sensors/oven-{i % 7}/temperature",
                    json.dumps({"celsius": 20 + i % 140, "ts": 1_800_000_000 + i,
                                "sensor": f"oven-{i % 7}"}).encode(),
                    1_800_000_000.0 + i, "temperature", 0) for i in range(n)]


def answer(i: int) -> Answer:
    output = {"level": ("normal", "warning", "critical")[i % 3]}
    return Answer(output=output, error=None,
                  completion=Completion(json.dumps(output), 180, 6, "stop", 48.0),
                  model=MODEL, raw=None, executor="local", executor_reason=None)


def history_size(path: Path) -> tuple[int, int]:
    """The history's rows, and the bytes of the pages its table and index use (-1 from a
    SQLite built without the dbstat table)."""
    conn = connect(path)
    try:
        rows = int(conn.execute("SELECT count(*) FROM history").fetchone()[0])
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
        try:
            return rows, page * int(conn.execute(
                "SELECT count(*) FROM dbstat WHERE name IN ('history', 'history_id')"
            ).fetchone()[0])
        except sqlite3.Error:
            return rows, -1
    finally:
        conn.close()


def run(n: int, directory: Path) -> dict[str, object]:
    data = readings(n)
    bounds = {"history": StoreSection(), "none": StoreSection(history_max_rows=0)}
    conns = {}
    for name in bounds:
        conn = connect(directory / f"{name}.db")
        open_schema(conn)
        for start in range(0, n, 256):
            transactions.ingest(conn, data[start:start + 256], [], bounds[name])
        conns[name] = conn
    wall: dict[str, list[float]] = {name: [] for name in bounds}
    cpu: dict[str, list[float]] = {name: [] for name in bounds}
    for i in range(n):
        for name, conn in conns.items():
            leased = transactions.lease(conn, ())
            assert leased is not None
            row = result_row(TOPICS, leased, json.loads(leased.payload), answer(i), "v1")
            w, c = time.perf_counter(), time.thread_time()
            transactions.complete(conn, leased.id, row, bounds[name],
                                  bounds[name].history_max_rows > 0)
            cpu[name].append(time.thread_time() - c)
            wall[name].append(time.perf_counter() - w)
    for conn in conns.values():
        conn.close()
    rows, size = history_size(directory / "history.db")
    result: dict[str, object] = {"readings": n, "history_rows": rows,
                                 "history_bytes": size,
                                 "bytes_per_row": round(size / rows) if size > 0 else None}
    for name in bounds:
        result[f"{name}_wall_ms_median"] = round(statistics.median(wall[name]) * 1e3, 3)
        result[f"{name}_wall_ms_mean"] = round(statistics.fmean(wall[name]) * 1e3, 3)
        result[f"{name}_cpu_us_mean"] = round(statistics.fmean(cpu[name]) * 1e6, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=10_000)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the two stores go (a real disk: fsync is the point)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with TemporaryDirectory(dir=args.dir) as tmp:
        result = run(args.readings, Path(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
