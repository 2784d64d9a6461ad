"""Evaluation before shipping: each GGUF answers the held-out set through llama.cpp, under the
route's JSON-schema grammar, the way the agent's worker answers a reading (its Engine, the
route's prompt, max_tokens, temperature and prefix key), and is scored on what it said.

Accuracy is exact match of the parsed output with the label; schema-valid is the share of
answers that parse strictly and satisfy the schema; latency is the worker's own figure per
request (prompt and answer, the route's prefix cached as in the agent), with the threads the
agent's configuration gives its worker.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.base.validation import check_output
from agent.config.settings import Route
from agent.flows.executors import prefix_key
from agent.specialize import llamacpp
from agent.specialize.examples import Sample


@dataclass(frozen=True, slots=True)
class Scores:
    label: str
    path: Path
    size_bytes: int
    accuracy: float
    schema_valid: float
    p50_ms: float
    p95_ms: float
    texts: tuple[str, ...]  # the raw answers, in the evaluation set's order
    hits: tuple[bool, ...]  # which of them were right

    def agreement(self, texts: list[str]) -> float:
        """The share of answers identical to `texts` (another model's, same order)."""
        same = sum(a == b for a, b in zip(self.texts, texts, strict=True))
        return same / len(texts)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "file": self.path.name, "size_bytes": self.size_bytes,
                "accuracy": self.accuracy, "schema_valid": self.schema_valid,
                "p50_ms": self.p50_ms, "p95_ms": self.p95_ms}


def evaluate(label: str, path: Path, route: Route, held: list[Sample], *, n_ctx: int,
             n_threads: int | None = None, n_threads_batch: int | None = None,
             note: Callable[[str], None] = lambda _: None) -> Scores:
    """Score the GGUF at `path` on `held`, with the worker's thread counts (the agent
    configuration's [model] n_threads and n_threads_batch)."""
    engine = llamacpp.open_engine(path, n_ctx=n_ctx, n_threads=n_threads,
                                  n_threads_batch=n_threads_batch)
    texts: list[str] = []
    hits: list[bool] = []
    latencies: list[float] = []
    valid = 0
    for index, example in enumerate(held):
        response = engine.complete({
            "messages": example.messages(route),
            "max_tokens": route.max_tokens, "temperature": route.temperature, "seed": 0,
            "schema": route.output_schema, "prefix_key": prefix_key(route)})
        if not response.get("ok", True):
            raise RuntimeError(f"{path}: {response.get('error')}")
        text = str(response["text"])
        texts.append(text)
        latencies.append(float(response["latency_ms"]))
        value, problem = check_output(text, route.output_schema or {})
        valid += problem is None
        hits.append(problem is None and value == example.output)
        if (index + 1) % 100 == 0:
            note(f"{label}: {index + 1}/{len(held)} answered")
    latencies.sort()
    return Scores(label, path, path.stat().st_size, sum(hits) / len(held), valid / len(held),
                  statistics.median(latencies),
                  latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
                  tuple(texts), tuple(hits))


def table(rows: list[Scores], reference: list[str] | None) -> str:
    """The evaluation table; `= torch` is each file's agreement with the trained model's own
    greedy answers (`reference`), when given."""
    head = f"{'model':<10} {'file':<34} {'MB':>6} {'accuracy':>8} {'valid':>6} " \
           f"{'p50 ms':>7} {'p95 ms':>7}" + (f" {'= torch':>7}" if reference else "")
    lines = [head, "-" * len(head)]
    for s in rows:
        line = (f"{s.label:<10} {s.path.name:<34} {s.size_bytes / 1e6:>6.2f} {s.accuracy:>8.3f} "
                f"{s.schema_valid:>6.3f} {s.p50_ms:>7.1f} {s.p95_ms:>7.1f}")
        if reference:
            line += f" {s.agreement(reference):>7.3f}"
        lines.append(line)
    return "\n".join(lines)
