"""How a candidate model is judged: the canary before it takes traffic, and the probation
verdict after. The canary talks to the candidate's worker; the verdict is pure logic over
agent/inference/switch.py's figures. Decides nothing about state or switching; agent/ota/updates.py
does.

Golden sets (agent/ota/modelpkg.py) check expected answers, not only their form: each item is
asked with the route's prompt exactly as the pipeline builds it (agent/routing/prompts.py, the
route's prefix key), greedy, under the route's schema; accuracy is the share whose parsed output
equals the expected output. `run_golden` runs for the canary (the candidate's own worker) and
again at the end of probation (the serving worker), and fails under the manifest's floor.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.base.errors import AgentError
from agent.base.records import Completion, Generation
from agent.base.validation import check_output
from agent.config.settings import OtaSection, Route
from agent.inference.switch import Figures, Served
from agent.ota.modelpkg import Canary, Golden, GoldenItem, Manifest, check_golden, load_golden
from agent.routing.prompts import build_messages, prefix_key

CANARY_TOPIC = "canary/{route}"


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    reason: str
    figures: dict[str, Any]


def canaries_for(routes: Sequence[Route], declared: Sequence[Canary]) -> list[Canary]:
    """The manifest's canaries for routes this agent has; if none apply, one per route."""
    names = {route.name for route in routes}
    usable = [c for c in declared if c.route in names]
    return usable or [Canary(route.name, {"canary": True}, None) for route in routes]


async def run_canary(
    served: Served, routes: Sequence[Route], canaries: Sequence[Canary], ota: OtaSection,
    seed: int,
) -> Verdict:
    """Every canary answer must be schema-valid and within its latency budget. The latency
    leaves out the time the candidate was held while the serving worker answered
    (agent/inference/hold.py): that wait is the live readings', not the model's."""
    by_name = {route.name: route for route in routes}
    answers: list[dict[str, Any]] = []
    for canary in canaries:
        route = by_name[canary.route]
        budget = min(ota.canary_latency_budget_ms, canary.max_latency_ms or float("inf"))
        messages = build_messages(route, CANARY_TOPIC.format(route=route.name),
                                  json.dumps(canary.payload))
        started, held_before_s = time.monotonic(), served.worker.held_s
        try:
            completion = await served.complete(
                messages, Generation(route.max_tokens, 0.0, seed, route.output_schema))
        except AgentError as exc:
            return Verdict(False, f"canary on route {route.name} failed: {exc}",
                           {"answers": answers})
        held_ms = round((served.worker.held_s - held_before_s) * 1000, 1)
        latency_ms = round((time.monotonic() - started) * 1000 - held_ms, 1)
        answers.append({"route": route.name, "latency_ms": latency_ms,
                        "budget_ms": budget, **({"held_ms": held_ms} if held_ms else {})})
        if route.output_schema is not None:
            _, problem = check_output(completion.text, route.output_schema)
            if problem is not None:
                return Verdict(False, f"canary on route {route.name}: {problem}",
                               {"answers": answers, "raw": completion.text[:200]})
        if latency_ms > budget:
            return Verdict(False, f"canary on route {route.name} took {latency_ms} ms, "
                           f"over the {budget} ms budget", {"answers": answers})
    return Verdict(True, "canary passed", {"answers": answers})


@dataclass(frozen=True, slots=True)
class GoldenSet:
    """A golden set of the package, for a route this agent has, with its items."""

    golden: Golden
    route: Route
    items: list[GoldenItem]


Complete = Callable[[list[dict[str, str]], Generation], Awaitable[Completion]]
MISSES_SHOWN = 3


def golden_sets(directory: Path, manifest: Manifest, routes: Sequence[Route]
                ) -> tuple[list[GoldenSet], list[str]]:
    """The package's golden sets for routes this agent has (each file's size and sha256
    checked again, then parsed), and the routes of those it has not. Blocking; PackageRejected
    naming the file."""
    by_name = {route.name: route for route in routes}
    check_golden(directory, manifest)
    sets = [GoldenSet(g, by_name[g.route], load_golden(directory / g.file))
            for g in manifest.golden if g.route in by_name]
    skipped = [g.route for g in manifest.golden if g.route not in by_name]
    return sets, skipped


def spread(items: Sequence[GoldenItem], limit: int) -> list[GoldenItem]:
    """At most `limit` items, evenly spread over the set (the same ones every time)."""
    if len(items) <= limit:
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


async def run_golden(complete: Complete, sets: Sequence[GoldenSet], limit: int, seed: int
                     ) -> Verdict:
    """Ask up to `limit` items of each set, one at a time; fail the first set under its floor.
    An item whose request fails counts as a miss. Figures: per set, n, right, accuracy, floor
    and the first few misses."""
    results: list[dict[str, Any]] = []
    for golden_set in sets:
        route, golden = golden_set.route, golden_set.golden
        asked = spread(golden_set.items, limit)
        generation = Generation(route.max_tokens, 0.0, seed, route.output_schema,
                                prefix_key(route))
        right = 0
        misses: list[dict[str, Any]] = []
        for item in asked:
            try:
                completion = await complete(build_messages(route, item.topic, item.payload),
                                            generation)
            except AgentError as exc:
                answer: Any = None
                problem: str | None = f"request failed: {exc}"
            else:
                answer, problem = check_output(completion.text, route.output_schema or {})
                if problem is not None:
                    answer = completion.text[:200]
            if problem is None and answer == item.expected:
                right += 1
            elif len(misses) < MISSES_SHOWN:
                misses.append({"topic": item.topic, "reading": item.payload[:200],
                               "expected": item.expected, "answer": answer,
                               **({} if problem is None else {"problem": problem})})
        accuracy = right / len(asked)
        results.append({"route": route.name, "file": golden.file, "n": len(asked),
                        "right": right, "accuracy": round(accuracy, 4),
                        "floor": golden.min_accuracy, "misses": misses})
        if accuracy < golden.min_accuracy:
            return Verdict(False, f"accuracy {round(accuracy, 3):g} on {len(asked)} golden "
                           f"readings of route {route.name}, under the manifest's floor "
                           f"{golden.min_accuracy:g}", {"golden": results})
    return Verdict(True, "golden sets passed", {"golden": results})


def probation_verdict(
    candidate: Figures, baseline: Figures | None, ota: OtaSection, fallback_p95_ms: float
) -> Verdict:
    """Fail on error rate, schema failures, or p95 latency over the previous model's times
    `probation_latency_factor` (over `fallback_p95_ms` when the previous model has no figures).
    """
    figures: dict[str, Any] = {"candidate": candidate.to_json(),
               "previous": None if baseline is None else baseline.to_json()}
    if candidate.error_rate > ota.probation_max_error_rate:
        return Verdict(False, f"error rate {candidate.error_rate:.2f} over "
                       f"{ota.probation_max_error_rate}", figures)
    if candidate.schema_failure_rate > ota.probation_max_schema_failure_rate:
        return Verdict(False, f"schema failure rate {candidate.schema_failure_rate:.2f} over "
                       f"{ota.probation_max_schema_failure_rate}", figures)
    if baseline is not None and baseline.p95_ms is not None:
        limit = baseline.p95_ms * ota.probation_latency_factor
        figures["p95_limit_ms"] = round(limit, 1)
        source = "the previous model's p95"
    else:
        limit = fallback_p95_ms
        figures["p95_limit_ms"] = limit
        source = "the canary latency budget"
    if candidate.p95_ms is not None and candidate.p95_ms > limit:
        return Verdict(False, f"p95 latency {candidate.p95_ms:.1f} ms over {limit:.1f} ms "
                       f"({source})", figures)
    return Verdict(True, "probation passed", figures)
