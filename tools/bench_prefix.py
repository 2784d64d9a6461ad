"""Prefix-cache benchmark: per-reading latency of the real inference worker on the bench model
with a route prompt of about 1,000 tokens, with and without the prefix cache.

Two routes alternate reading by reading, the case the cache is for: without it, llama-cpp-python
reuses only what the previous request (of the other route) shares with this one, the system
prompt; with it, the worker restores the route's own evaluated prefix. The first reading of each
route is left out (it fills the cache). A third row runs one route alone, where llama-cpp-python's
own reuse of the previous request already applies. The cases run in turn, reading by reading, in
three workers, so that a shared machine's load falls on each alike.

Usage: tools/bench_prefix.py [--readings N] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.base.records import Generation
from agent.config.settings import ModelSection, Route
from agent.flows.executors import prefix_key
from agent.inference.supervisor import InferenceWorker, identify
from agent.routing.prompts import build_messages
from tools.make_tiny_model import make_model

SCHEMA = {"type": "object", "required": ["level"], "additionalProperties": False,
          "properties": {"level": {"enum": ["normal", "warning", "critical"]}}}
FILLER = ("the level of the machine is normal when the temperature is in range a warning when it "
          "is high and critical when it is too high")


def route(name: str, words: int = 290) -> Route:
    """A route whose prompt is about 1,000 tokens of the bench model's small vocabulary."""
    vocabulary = FILLER.split()
    text = " ".join(vocabulary[i % len(vocabulary)] for i in range(words))
    return Route(name=name, topics=["s/#"], instruction=f"Route {name}. {text}",
                 output_schema=SCHEMA, max_tokens=16)


async def started(model: Path) -> InferenceWorker:
    section = ModelSection(path=model, n_ctx=2048, n_threads=2, request_timeout_s=600)
    worker = InferenceWorker(section, await identify(section, "bench"))
    await worker.start()
    return worker


async def run(model: Path, readings: int) -> dict[str, dict[str, float]]:
    """Three workers on the same model, asked in turn reading by reading, so that a shared
    machine's load falls on every case alike: two routes alternating without and with the prefix
    cache, and one route alone without it."""
    cases = {"two routes alternating, no prefix cache": ("ab", False),
             "two routes alternating, prefix cache": ("ab", True),
             "one route, no prefix cache": ("a", False)}
    workers = {name: await started(model) for name in cases}
    routes = {name: route(name) for name in "ab"}
    samples: dict[str, list[tuple[float, int, int]]] = {name: [] for name in cases}
    try:
        for i in range(readings + 2):
            for name, (names, cached) in cases.items():
                r = routes[names[i % len(names)]]
                messages = build_messages(r, "s/1", json.dumps({"seq": i, "celsius": 20 + i}))
                c = await workers[name].complete(
                    messages, Generation(16, 0.0, 0, SCHEMA, prefix_key(r) if cached else None))
                # Latency only: the tiny model of --quick runs may cut an answer short.
                if i >= 2:  # the first reading of each route fills the cache
                    samples[name].append((c.latency_ms, c.prompt_tokens, c.reused_tokens))
    finally:
        for worker in workers.values():
            await worker.close()
    return {name: {"median_ms": statistics.median(s[0] for s in rows),
                   "mean_ms": statistics.fmean(s[0] for s in rows),
                   "prompt_tokens": statistics.median(s[1] for s in rows),
                   "reused_tokens": statistics.median(s[2] for s in rows)}
            for name, rows in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(prog="tools/bench_prefix.py")
    parser.add_argument("--readings", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "bench.gguf", preset="bench")
        rows = asyncio.run(run(model, args.readings))
    print("| case | prompt tokens | reused tokens | median ms/reading | mean ms/reading |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['prompt_tokens']:.0f} | {row['reused_tokens']:.0f} | "
              f"{row['median_ms']:.0f} | {row['mean_ms']:.0f} |")
    speedup = (rows["two routes alternating, no prefix cache"]["median_ms"]
               / rows["two routes alternating, prefix cache"]["median_ms"])
    print(f"prefix-cache speed-up per reading (median, alternating routes): {speedup:.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "speedup": speedup}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
