"""What `edge-agent status` and `edge-agent queue` print: read-only views for an operator.

Reads a running agent through its /metrics endpoint and the store through read-only SQLite
connections (agent/store/views.py's read_* functions), so both commands are safe while the agent
runs and never write anything. Blocking I/O is fine here: this is the command line, not the daemon.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from agent.base.errors import StoreUnreadable
from agent.base.records import QueueStats
from agent.config.settings import Settings
from agent.service.metrics import PREFIX, scrape
from agent.store.views import read_dead_letters, read_oldest, read_stats

Series = dict[str, list[tuple[dict[str, str], float]]]


def metrics_url(settings: Settings) -> str | None:
    service = settings.service
    if not service.metrics_enabled or service.metrics_port == 0:
        return None
    host = "127.0.0.1" if service.metrics_host in ("0.0.0.0", "") else service.metrics_host
    return f"http://{host}:{service.metrics_port}/metrics"


def _value(series: Series, name: str, **labels: str) -> float | None:
    for found, value in series.get(f"{PREFIX}_{name}", []):
        if all(found.get(k) == v for k, v in labels.items()):
            return value
    return None


def _queues(stats: QueueStats) -> str:
    oldest = ("none" if stats.oldest_undelivered_s is None
              else f"{stats.oldest_undelivered_s:.0f}s")
    return (f"inbox {stats.inbox} ({stats.inbox_bytes} B), outbox {stats.outbox} "
            f"({stats.outbox_bytes} B), oldest undelivered {oldest}, dead letters "
            f"{stats.dead_letter}, delivered {stats.delivered}")


def print_status(url: str | None, store_path: Path | None, out: TextIO) -> int:
    """A summary of a running agent from its metrics; 0 if it answered, 3 if not (the store's
    numbers are printed either way when the store can be read)."""
    series: Series | None = None
    if url is not None:
        try:
            series = scrape(url)
        except OSError as exc:
            print(f"agent: not answering at {url} ({exc})", file=out)
    else:
        print("agent: metrics endpoint unknown (pass --url)", file=out)
    if series is not None:
        ready = _value(series, "ready") == 1
        print(f"agent: running, {'ready' if ready else 'NOT READY'} ({url})", file=out)
        for labels, _ in series.get(f"{PREFIX}_model_info", []):
            print(f"model: {labels['name']} v{labels['version']} sha256 "
                  f"{labels['sha256'][:12]}", file=out)
        links = ", ".join(
            f"{broker} {'up' if _value(series, 'link_up', broker=broker) == 1 else 'DOWN'}"
            f" (reconnects {int(_value(series, 'reconnects_total', broker=broker) or 0)})"
            for broker in ("local", "cloud"))
        print(f"links: {links}", file=out)
        stalled = [labels["loop"] for labels, value in series.get(f"{PREFIX}_loop_stalled", [])
                   if value == 1]
        print(f"loops: {'STALLED ' + ', '.join(stalled) if stalled else 'all live'}", file=out)
        results = series.get(f"{PREFIX}_results_total", [])
        counts = ", ".join(f"{labels['route']}/{labels['executor']}/{labels['outcome']} "
                           f"{int(value)}" for labels, value in results) or "none yet"
        print(f"results this run: {counts}", file=out)
        restarts = int(_value(series, "worker_restarts_total") or 0)
        print(f"worker restarts: {restarts}", file=out)
    if store_path is not None:
        try:
            print(f"queues: {_queues(read_stats(store_path))}", file=out)
        except StoreUnreadable as exc:
            print(f"queues: cannot read the store: {exc}", file=out)
    return 0 if series is not None else 3


def _when(at: float) -> str:
    stamp = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp}Z ({time.time() - at:.0f}s ago)"


def print_queue(store_path: Path, limit: int, out: TextIO) -> int:
    """Depths, the oldest inbox and outbox rows, and dead letters with their reasons."""
    stats = read_stats(store_path)
    print(f"store: {store_path}", file=out)
    print(f"queues: {_queues(stats)}", file=out)
    for table in ("inbox", "outbox"):
        rows = read_oldest(store_path, table, limit)
        print(f"\noldest {table} rows ({len(rows)} of {getattr(stats, table)}):", file=out)
        for row in rows:
            print("  " + _row(table, row), file=out)
    letters = read_dead_letters(store_path, limit)
    print(f"\ndead letters ({len(letters)} newest of {stats.dead_letter}):", file=out)
    for letter in letters:
        print(f"  {_when(float(letter['created_at']))}  {letter['topic']}  id {letter['id']}\n"
              f"    reason: {letter['reason']}", file=out)
    return 0


def _row(table: str, row: dict[str, Any]) -> str:
    extra = (f"route {row['route']}, attempts {row['attempts']}"
             f"{', leased' if row['leased'] else ''}" if table == "inbox"
             else f"{row['kind']}")
    return (f"#{row['seq']} {_when(float(row['at']))}  {row['topic']}  {extra}, "
            f"{row['payload_bytes']} B")
