"""Benchmark of `edge-agent model specialize` against issue 15's targets, in one run on one machine.

  (a) from the rule to a signed package: wall and CPU time of `edge-agent model specialize
      --rule ... --package-key ...` (a subprocess; CPU is its children's user + system time) for
      the temperature route of configs/agent.toml with the default recipe; target <= 15 min on
      2 cores;
  (b) per file (f32, f16, q8_0, q4_0): accuracy, schema-valid share, p50/p95 ms and size on the
      held-out readings (specialize's own evaluation, report.json); targets accuracy >= 0.97,
      schema-valid 1.00, size <= 10 MB;
  (c) latency per reading through the agent: real mosquitto brokers and `python -m agent run`
      serving the packaged q8_0 student; each held-out reading is published on the local broker
      50-250 ms after the previous one's result arrived (a closed loop) and timed until its
      result reaches a collector on the cloud broker; against raw llama-cpp-python on the same
      file, prompts (the agent's build_messages), grammar and threads, one call per reading;
      target <= 30 ms median;
  (d) with --base GGUF, that model scored on the same held-out set beside the student.

Usage: tools/bench_specialize.py [--quick] [--reuse DIR] [--base GGUF] [--json FILE] [--work DIR]
                                 [--batch-wait-ms MS]
  --quick   a few training steps and a dozen readings: a smoke test of the bench, not figures;
  --reuse   skip training: take an existing specialize output directory ((a) then comes from
            its report.json: training and the evaluation, not packaging).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.base import signing
from agent.base.validation import check_output
from agent.config.settings import Route
from agent.ota import modelpkg
from agent.routing.prompts import build_messages
from agent.specialize.examples import Example, read_jsonl
from agent.specialize.run import find_route
from tests.harness import AgentProcess, Mosquitto, wait_until, write_agent_config
from tools.bench import TimedCollector, _percentiles, _publisher

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "agent.toml"
ROUTE = "temperature"
RULE = "celsius<60:normal,celsius<85:warning,else:critical"
QUICK = ["--steps", "5", "--train-examples", "64", "--eval-examples", "12"]
THREADS = 2  # training's, and llama.cpp's in the agent and in the raw run
WARM = 3  # readings answered before timing: the first compiles the grammar and the prefix
TIMING = "bench-timing.json"  # (a) as measured, kept beside the output for --reuse
TARGET_WALL_S = 15 * 60
TARGET_ACCURACY = 0.97
TARGET_MB = 10.0
TARGET_P50_MS = 30.0


def _say(text: str) -> None:
    print(f"bench_specialize: {text}", file=sys.stderr, flush=True)


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def specialize(work: Path, quick: bool, base: Path | None) -> tuple[Path, dict[str, Any]]:
    """(a): the command from the rule to a signed package, timed; the package verified."""
    out = work / "student"
    key = work / "release.pem"
    public = signing.generate(key)
    command = [sys.executable, "-m", "agent", "model", "specialize", "--config", str(CONFIG),
               "--route", ROUTE, "--rule", RULE, "--out", str(out), "--threads", str(THREADS),
               "--package-key", str(key), "--package-version", "1",
               *(QUICK if quick else []), *(["--base", str(base)] if base else [])]
    log = work / "specialize.log"
    _say(f"specialize (log {log}) ...")
    cpu, started = _cpu_children(), time.perf_counter()
    with log.open("wb") as sink:
        done = subprocess.run(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    wall, cpu = time.perf_counter() - started, _cpu_children() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"specialize exited {done.returncode}: "
                           f"{log.read_text(errors='replace')[-2000:]}")
    modelpkg.verify_blocking(out / "package", [public])
    times = json.loads((out / "report.json").read_text())["times_s"]
    _say(f"specialize done in {wall:.0f} s ({cpu:.0f} s CPU)")
    timing = {"wall_s": wall, "cpu_s": cpu, "train_s": times["train_s"],
              "train_cpu_s": times["train_cpu_s"], "reused": False}
    (out / TIMING).write_text(json.dumps(timing) + "\n")
    return out, timing


def reused(out: Path) -> dict[str, Any]:
    """The timing this bench measured for `out`, or what its report.json says."""
    if (out / TIMING).exists():
        return dict(json.loads((out / TIMING).read_text()))
    times = json.loads((out / "report.json").read_text())["times_s"]
    return {"wall_s": times["total_s"], "cpu_s": None, "train_s": times["train_s"],
            "train_cpu_s": times["train_cpu_s"], "reused": True}


def scores(out: Path, route: Route, held: list[Example], base: Path | None,
           n_threads: int | None, n_threads_batch: int | None) -> list[dict[str, Any]]:
    """(b) and (d): report.json's rows; a --base not in them is scored here."""
    rows: list[dict[str, Any]] = json.loads((out / "report.json").read_text())["scores"]
    if base is not None and not any(r["label"] == "base" for r in rows):
        from agent.specialize.evaluate import evaluate

        _say(f"scoring the base model {base} ...")
        rows.append(evaluate("base", base, route, held, n_ctx=2048, n_threads=n_threads,
                             n_threads_batch=n_threads_batch).to_json())
    return rows


def _route_toml() -> str:
    """The temperature route's [[routes]] table exactly as configs/agent.toml writes it."""
    text = CONFIG.read_text()
    for block in text.split("[[routes]]")[1:]:
        if re.search(rf'^name = "{ROUTE}"$', block, re.M):
            return "[[routes]]" + block
    raise ValueError(f"{CONFIG}: no route {ROUTE!r}")


def _served_model(out: Path) -> tuple[Path, int]:
    """The packaged file and its n_ctx (the q8_0 file and 512 for a reused run without one)."""
    manifest = out / "package" / modelpkg.MANIFEST
    if manifest.exists():
        body = json.loads(manifest.read_text())
        return out / "package" / body["file"], int(body["n_ctx"])
    return out / f"{ROUTE}-student-q8_0.gguf", 512


def through_agent(work: Path, model: Path, n_ctx: int, held: list[Example],
                  batch_wait_ms: int | None = None) -> dict[str, Any]:
    """(c): each held-out reading published after the previous one's result arrived;
    `batch_wait_ms` sets [local_broker] batch_wait_ms (default: the agent's, 20)."""
    local, cloud = Mosquitto("local", work).start(), Mosquitto("cloud", work).start()
    config = write_agent_config(work / "agent.toml", state_dir=work / "state", model_path=model,
                                local_port=local.port, cloud_port=cloud.port,
                                device_id="bench-specialize", routes=_route_toml())
    config.write_text(config.read_text().replace('log_level = "debug"', 'log_level = "info"')
                      .replace("n_threads = 1", f"n_threads = {THREADS}")
                      .replace("n_ctx = 512", f"n_ctx = {n_ctx}")
                      .replace("[cloud_broker]", "[cloud_broker]" if batch_wait_ms is None
                               else f"batch_wait_ms = {batch_wait_ms}\n\n[cloud_broker]"))
    collector = TimedCollector(cloud.port, client_id="bench-specialize-cloud").start()
    agent = AgentProcess(config, work / "agent.log").start()
    client = None
    try:
        agent.wait_for_event("agent_ready", 120)
        client = _publisher(local.port, "bench-specialize-sensors")
        pause = random.Random(15)
        latency: list[float] = []
        parts: dict[str, list[float]] = {"in_ms": [], "model_ms": [], "rest_ms": []}
        right = 0
        for index, example in enumerate([*held[:WARM], *held]):
            time.sleep(pause.uniform(0.05, 0.25))
            stamp = time.time()
            client.publish(example.topic, example.payload, qos=1).wait_for_publish(30)
            wait_until(lambda i=index: len(collector.results()) > i, 120,
                       f"the result of reading {index}", interval_s=0.005)
            result = collector.results()[index]
            if result["source"]["payload"] != example.reading:
                raise RuntimeError(f"result {index} is for {result['source']}, not "
                                   f"{example.payload}")
            # The collector keeps a message before it notes its arrival time.
            wait_until(lambda r=result: r["id"] in collector.arrived, 10,
                       f"the arrival time of result {index}", interval_s=0.005)
            if index >= WARM:
                total = (collector.arrived[result["id"]] - stamp) * 1000
                latency.append(total)
                # Where it went: publish -> the agent's ingest (its received_at), the worker's
                # own figure for the model, and the rest (commit, queue, uplink, cloud broker).
                parts["in_ms"].append((result["source"]["received_at"] - stamp) * 1000)
                parts["model_ms"].append(float(result.get("latency_ms") or 0.0))
                parts["rest_ms"].append(total - parts["in_ms"][-1] - parts["model_ms"][-1])
                right += result.get("status") == "ok" and result.get("output") == example.output
    finally:
        if client is not None:
            client.disconnect()
            client.loop_stop()
        agent.terminate()
        collector.stop()
        local.kill()
        cloud.kill()
    p50, p95 = _percentiles(latency)
    return {"readings": len(latency), "p50_ms": p50, "p95_ms": p95,
            "accuracy": right / len(latency),
            **{f"{name}_p50": _percentiles(values)[0] for name, values in parts.items()}}


def raw(model: Path, n_ctx: int, route: Route, held: list[Example]) -> dict[str, Any]:
    """(c)'s reference: llama-cpp-python on the same file, prompts, grammar and threads."""
    from llama_cpp import Llama
    from llama_cpp.llama_grammar import LlamaGrammar

    llm = Llama(model_path=str(model), n_ctx=n_ctx, n_threads=THREADS, n_threads_batch=THREADS,
                seed=0, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(route.output_schema, sort_keys=True),
                                            verbose=False)
    latency: list[float] = []
    right = 0
    for index, example in enumerate([*held[:WARM], *held]):
        started = time.perf_counter()
        out: Any = llm.create_chat_completion(
            messages=build_messages(route, example.topic, example.payload),  # type: ignore[arg-type]
            max_tokens=route.max_tokens, temperature=route.temperature, seed=0,
            grammar=grammar)
        elapsed = (time.perf_counter() - started) * 1000
        if index >= WARM:
            latency.append(elapsed)
            value, problem = check_output(out["choices"][0]["message"]["content"] or "",
                                          route.output_schema or {})
            right += problem is None and value == example.output
    p50, p95 = _percentiles(latency)
    return {"readings": len(latency), "p50_ms": p50, "p95_ms": p95,
            "accuracy": right / len(latency)}


def run(work: Path, quick: bool, reuse: Path | None, base: Path | None,
        batch_wait_ms: int | None = None) -> dict[str, Any]:
    settings, route = find_route(CONFIG, ROUTE)
    if reuse is None:
        out, timing = specialize(work, quick, base)
    else:
        out, timing = reuse, reused(reuse)
    held = read_jsonl(out / "eval.jsonl")
    rows = scores(out, route, held, base, settings.model.n_threads,
                  settings.model.threads_batch)
    model, n_ctx = _served_model(out)
    _say(f"{len(held)} readings through the agent serving {model} ...")
    agent = through_agent(work, model, n_ctx, held, batch_wait_ms)
    _say("the same through llama-cpp-python ...")
    direct = raw(model, n_ctx, route, held)
    return {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(), "threads": THREADS,
                        "load_average": os.getloadavg()},
            "quick": quick, "output": str(out), "held_out": len(held), "specialize": timing,
            "files": rows, "served": model.name, "agent": agent, "raw": direct,
            "batch_wait_ms": batch_wait_ms}


def table(results: dict[str, Any]) -> str:
    timing, agent, direct = results["specialize"], results["agent"], results["raw"]
    q8 = next(r for r in results["files"] if r["label"] == "q8_0")
    mb = q8["size_bytes"] / 1e6
    how = "report.json of --reuse: no packaging" if timing["reused"] else "rule to signed package"
    cores = "" if timing["cpu_s"] is None else f"{timing['cpu_s'] / timing['wall_s']:.2f} cores"
    cpu = "(not in report.json)" if timing["cpu_s"] is None else f"{timing['cpu_s']:.0f} s"
    load = ", ".join(f"{x:.1f}" for x in results["machine"]["load_average"])
    lines = [f"Load average at the end: {load} ({results['machine']['cores']} cores).", "",
             "| measure | measured | target | ratio |", "|---|---:|---:|---:|",
             f"| wall time, {how} | {timing['wall_s']:.0f} s | <= {TARGET_WALL_S} s (15 min, "
             f"2 cores) | {timing['wall_s'] / TARGET_WALL_S:.2f} |",
             f"| CPU time, {how} | {cpu} | | {cores} |",
             f"| of which training, wall (CPU) | {timing['train_s']:.0f} s "
             f"({timing['train_cpu_s']:.0f} s) | | |",
             f"| q8_0 accuracy, {results['held_out']} held-out readings | {q8['accuracy']:.3f} "
             f"| >= {TARGET_ACCURACY} | {q8['accuracy'] / TARGET_ACCURACY:.3f} |",
             f"| q8_0 schema-valid | {q8['schema_valid']:.3f} | 1.00 | "
             f"{q8['schema_valid']:.3f} |",
             f"| q8_0 size | {mb:.2f} MB | <= {TARGET_MB:g} MB | {mb / TARGET_MB:.3f} |",
             f"| latency through the agent, p50 ({agent['readings']} readings"
             + ("" if results.get("batch_wait_ms") is None else
                f", batch_wait_ms {results['batch_wait_ms']}") + ") | "
             f"{agent['p50_ms']:.1f} ms | <= {TARGET_P50_MS:g} ms | "
             f"{agent['p50_ms'] / TARGET_P50_MS:.2f} |",
             f"| latency through the agent, p95 | {agent['p95_ms']:.1f} ms | | |",
             f"| of which (p50 each): to the agent / model / commit, queue and uplink | "
             f"{agent['in_ms_p50']:.1f} / {agent['model_ms_p50']:.1f} / "
             f"{agent['rest_ms_p50']:.1f} ms | | |",
             f"| raw llama-cpp-python, p50 / p95 | {direct['p50_ms']:.1f} / "
             f"{direct['p95_ms']:.1f} ms | | agent/raw {agent['p50_ms'] / direct['p50_ms']:.2f}"
             f" / {agent['p95_ms'] / direct['p95_ms']:.2f} |",
             f"| accuracy through the agent / raw | {agent['accuracy']:.3f} / "
             f"{direct['accuracy']:.3f} | | |",
             "",
             "| file | MB | accuracy | schema-valid | p50 ms | p95 ms | accuracy / 0.97 "
             "| MB / 10 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["files"]:
        size = row["size_bytes"] / 1e6
        lines.append(f"| {row['label']}: {row['file']} | {size:.2f} | {row['accuracy']:.3f} | "
                     f"{row['schema_valid']:.3f} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | "
                     f"{row['accuracy'] / TARGET_ACCURACY:.3f} | {size / TARGET_MB:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    parser.add_argument("--reuse", type=Path, default=None, metavar="DIR",
                        help="an existing `model specialize` output: no training")
    parser.add_argument("--base", type=Path, default=None, metavar="GGUF",
                        help="a model to score beside the student (e.g. a pretrained base)")
    parser.add_argument("--json", type=Path, default=Path("bench-specialize.json"))
    parser.add_argument("--batch-wait-ms", type=int, default=None, metavar="MS",
                        help="the agent's [local_broker] batch_wait_ms (default its 20: the "
                        "wait a lone reading pays before its commit)")
    parser.add_argument("--work", type=Path, default=None, metavar="DIR",
                        help="work here and keep it (the student, its package, the logs: "
                        "reusable with --reuse DIR/student); default a temporary directory")
    args = parser.parse_args(argv)
    if args.reuse is not None and not (args.reuse / "report.json").exists():
        parser.error(f"--reuse {args.reuse}: no report.json there (not a specialize output)")
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        results = run(args.work.resolve(), args.quick, args.reuse, args.base,
                      args.batch_wait_ms)
    else:
        with TemporaryDirectory(prefix="edge-bench-specialize-") as tmp:
            results = run(Path(tmp), args.quick, args.reuse, args.base, args.batch_wait_ms)
        if args.reuse is None:
            results["output"] = None  # the temporary directory is gone
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
