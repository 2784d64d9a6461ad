"""`edge-agent queue export`: a route's readings and the agent's answers, as a labels file.

Writes one JSON line per answered reading the store holds, in the format `edge-agent model
specialize --labels` reads (agent/specialize/examples.py load_labels):

    {"topic": ..., "reading": {...}, "output": {...}, "id": ..., "received_at": ...,
     "model": {"name": ..., "version": ..., "executor": ...}}

so that an operator can correct the answers that are wrong and specialize on real readings;
load_labels reads topic, reading and output and ignores the provenance. Two sources, merged
oldest first: the store's history of answered readings (kept after delivery, up to [store]
history_max_rows; agent/store/transactions.py record_history) and the results still in the
outbox whose reading is not in it (made before the history existed, while it was off or
yielding to a full disk, or failed). A result in both is written once.

A result is left out, and counted in the summary, when it failed (no output), covers a window
of readings (a window route's answer is not one reading's label), has a reading that is not a
JSON object, or an output that no longer satisfies the route's output_schema. Dead letters and
readings still waiting in the inbox have no output: they are counted, never exported.

Reads the store through one read-only connection (agent/store/views.py read_route), safe while
the agent runs. The data goes to --out (written to a temporary file beside it and renamed, so
a file there is always whole) or stdout; progress and the summary go to stderr.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from agent.base.validation import schema_violation
from agent.config.settings import Route, Settings
from agent.routing.topics import topic_matches
from agent.store.views import AnsweredReading, RouteReader, StoredResult, read_route

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
PROGRESS_EVERY = 5000  # rows between progress lines on stderr


def parse_since(text: str, now: float | None = None) -> float:
    """Epoch seconds of `text`: an ISO-8601 time (UTC unless it says otherwise) or a duration
    back from now (90s, 30m, 24h, 7d)."""
    match = _DURATION.match(text)
    if match:
        return (time.time() if now is None else now) - float(match[1]) * _UNIT_S[match[2]]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r} is neither an ISO-8601 time "
                         "(2026-12-01T08:00:00Z) nor a duration (90s, 30m, 24h, 7d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def find_route(settings: Settings, config: Path, name: str) -> Route:
    for route in settings.routes:
        if route.name == name:
            return route
    raise ValueError(f"{config}: no route named {name!r}; routes: "
                     f"{', '.join(r.name for r in settings.routes)}")


@dataclass(slots=True)
class Tally:
    exported: int = 0
    from_history: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    waiting: int = 0

    def summary(self, route: str, where: str) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return (f"queue export: route {route}: {self.exported} results exported to {where}; "
                f"{skipped} skipped{f' ({reasons})' if reasons else ''}; not exported (no "
                f"output): {self.dead_letters} dead letters on the route's topics, "
                f"{self.waiting} readings waiting in the inbox; {self.from_history} of the "
                "results read from the history of answered readings, the rest from the outbox")


def label_line(result: StoredResult, route: Route) -> tuple[dict[str, Any] | None, str]:
    """The labels line of one stored result, or (None, why it is left out)."""
    try:
        body = json.loads(result.body)
    except ValueError:
        return None, "not JSON"
    if not isinstance(body, dict):
        return None, "not JSON"
    source = body.get("source")
    if isinstance(source, list):
        return None, "window results"
    if body.get("status") != "ok" or body.get("output") is None:
        return None, "failed results"
    if not isinstance(source, dict) or not isinstance(source.get("payload"), dict):
        return None, "readings not a JSON object"
    output = body["output"]
    if not isinstance(output, dict):
        return None, "outputs not a JSON object"
    if route.output_schema is not None and schema_violation(output, route.output_schema):
        return None, "outputs the route's output_schema refuses"
    model = body.get("model")
    if not isinstance(model, dict):
        model = {}
    return {"topic": source.get("topic"), "reading": source["payload"], "output": output,
            "id": body.get("id"), "received_at": source.get("received_at"),
            "model": {"name": model.get("name"), "version": model.get("version"),
                      "executor": body.get("executor")}}, ""


def history_line(row: AnsweredReading, route: Route) -> tuple[dict[str, Any] | None, str]:
    """The labels line of one row of the history (an ok result of one reading), or (None, why
    it is left out): the same line label_line makes of the same result in the outbox."""
    try:
        reading, output = json.loads(row.reading), json.loads(row.output)
    except ValueError:
        return None, "not JSON"
    if not isinstance(reading, dict):
        return None, "readings not a JSON object"
    if not isinstance(output, dict):
        return None, "outputs not a JSON object"
    if route.output_schema is not None and schema_violation(output, route.output_schema):
        return None, "outputs the route's output_schema refuses"
    return {"topic": row.topic, "reading": reading, "output": output, "id": row.id,
            "received_at": row.received_at,
            "model": {"name": row.model_name, "version": row.model_version,
                      "executor": row.executor}}, ""


def stored_answers(reader: RouteReader, route: Route,
                   since: float | None) -> Iterator[AnsweredReading | StoredResult]:
    """The route's history and its outbox results whose reading is not in the history, merged
    by the time each result was made (oldest first). The outbox's are left out by the read
    (agent/store/views.py); a row the agent moves between the two reads' pages (a history row
    pruned after it was read, its result still queued) has the same id and the same time in
    both, which is how it is written once here."""
    history: Iterator[AnsweredReading | StoredResult] = reader.history(route.name, since)
    queued: Iterator[AnsweredReading | StoredResult] = reader.results(route.name, since)
    merged = heapq.merge(history, queued, key=lambda item: item.created_at)
    at: float | None = None
    ids: set[str] = set()
    for item in merged:
        if item.created_at != at:
            at, ids = item.created_at, set()
        if item.id and item.id in ids:
            continue
        ids.add(item.id)
        yield item


def export(settings: Settings, route: Route, since: float | None, out: TextIO,
           log: TextIO) -> Tally:
    """Write the labels lines of `route`'s stored results to `out`; the tally of what was and
    was not written."""
    tally = Tally()
    started = time.monotonic()
    with read_route(settings.store_path) as reader:
        for seen, item in enumerate(stored_answers(reader, route, since), 1):
            if isinstance(item, AnsweredReading):
                line, why = history_line(item, route)
            else:
                line, why = label_line(item, route)
            if line is None:
                tally.skipped[why] += 1
            else:
                out.write(json.dumps(line) + "\n")  # ASCII: whatever stdout's encoding
                tally.exported += 1
                tally.from_history += isinstance(item, AnsweredReading)
            if seen % PROGRESS_EVERY == 0:
                rate = seen / max(time.monotonic() - started, 1e-9)
                print(f"queue export: {seen} results read ({tally.exported} exported), "
                      f"{rate:.0f}/s", file=log, flush=True)
        tally.waiting = reader.waiting(route.name)
        tally.dead_letters = sum(
            1 for topic in reader.dead_letter_topics(since)
            if any(topic_matches(f, topic) for f in route.topics))
    return tally


def run(settings: Settings, config: Path, route_name: str, since_text: str | None,
        out_path: str, log: TextIO) -> int:
    """`edge-agent queue export`; 0 when the lines are written (even none: the summary says
    so)."""
    route = find_route(settings, config, route_name)
    since = parse_since(since_text) if since_text is not None else None
    if out_path == "-":
        tally = export(settings, route, since, sys.stdout, log)
        sys.stdout.flush()
        where = "stdout"
    else:
        target = Path(out_path)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            with partial.open("w", encoding="utf-8") as handle:
                tally = export(settings, route, since, handle, log)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        where = str(target)
    print(tally.summary(route.name, where), file=log, flush=True)
    return 0
