"""The edge-agent demo, on real parts: two mosquitto brokers on loopback (the gateway's and a
stand-in for the cloud's), a generated GGUF model, the agent, and a sensor simulator.

It shows, in order: results flowing; a signed model update swapped in while readings flow; a
slower version that passes its canary, fails probation and is rolled back by the agent; a
cloud outage bridged by the SQLite outbox with nothing lost; a malformed payload dead-lettered
with its reason; a graceful stop. Run it with tools/demo.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import modelpkg, signing
from agent.storeviews import read_counts
from tools.harness import (
    AgentProcess,
    CloudCollector,
    Mosquitto,
    publish_readings,
    wait_until,
    write_agent_config,
)
from tools.make_tiny_model import make_model

SENSORS = ["press-1", "oven-2", "cooler-3"]


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


class Simulator:
    """Sensors that publish temperature readings with a sequence number (QoS 1)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent = 0
        self._rng = random.Random(7)

    def burst(self, n: int) -> None:
        readings = []
        for _ in range(n):
            sensor = SENSORS[self.sent % len(SENSORS)]
            body = {"sensor": sensor, "seq": self.sent, "ts": time.time(),
                    "celsius": round(self._rng.uniform(15, 95), 1)}
            readings.append((f"sensors/{sensor}/temperature", json.dumps(body).encode()))
            self.sent += 1
        publish_readings(self.port, readings, client_id="demo-sensors")

    def run_for(self, seconds: float, per_second: int) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.burst(per_second)
            time.sleep(1)


def show_results(collector: CloudCollector, since: int, limit: int = 5) -> int:
    results = collector.results()
    for body in results[since:since + limit]:
        reading = body["source"]["payload"]
        say(f"  result {body['id'][:8]}  {body['source']['topic']:<30} "
            f"{reading['celsius']:>5} C -> {json.dumps(body['output'])}  "
            f"({body['executor']}, {body['latency_ms']} ms, model sha256 "
            f"{body['model']['sha256'][:10]})")
    return len(results)


def update(work: Path, config: Path, agent: AgentProcess, sim: Simulator,
           collector: CloudCollector, shown: int, rate: int, version: str, gguf: Path) -> int:
    """Sign `gguf` as `version`, hand it over with `edge-agent model install` while the
    sensors publish, print the update's steps and which model answered; returns `shown`."""
    package = work / f"package-v{version}"
    modelpkg.build(gguf, package, name="tiny-test", version=version, n_ctx=512,
                   canary=[{"route": "temperature", "payload": {"celsius": 85.0}}],
                   key=work / "release.pem")
    seen = len(agent.events())
    subprocess.run([sys.executable, "-m", "agent", "model", "install", str(package),
                    "--config", str(config)], check=True, stdout=subprocess.DEVNULL)
    before = sim.sent
    sim.run_for(4, rate)

    def steps() -> list[dict[str, Any]]:
        return [e for e in agent.events()[seen:] if e.get("event") == "model_update_step"]

    wait_until(lambda: any(e["step"] in ("committed", "rolled_back", "refused", "rejected")
                           for e in steps()), 120, f"version {version}'s verdict")
    for event in steps():
        say(f"   model {event.get('version', event.get('package'))}: {event['step']}"
            + (f" ({event['reason']})" if "reason" in event else ""))
    wait_until(lambda: len(collector.distinct_ids()) >= sim.sent, 120, "results")
    versions = Counter(body["model"]["version"] for body in collector.results()[shown:])
    say(f"   {sim.sent - before} readings during the update, results by model version: "
        f"{dict(versions)}, failed: "
        f"{sum(body['status'] != 'ok' for body in collector.results()[shown:])}")
    return len(collector.results())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("demo-state"),
                        help="where brokers, model, store and logs go (emptied first)")
    parser.add_argument("--rate", type=int, default=20, help="readings per second")
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    say(f"working in {work}")
    model = make_model(work / "models" / "tiny.gguf")
    say(f"generated a {model.stat().st_size // 1024} KiB llama GGUF model: {model}")
    local = Mosquitto("local", work).start()
    cloud = Mosquitto("cloud", work).start()
    say(f"local broker on 127.0.0.1:{local.port}, cloud broker on 127.0.0.1:{cloud.port}")
    collector = CloudCollector(cloud.port, client_id="demo-cloud-consumer").start()
    public = signing.generate(work / "release.pem")
    config = write_agent_config(work / "agent.toml", state_dir=work / "state",
                                model_path=model, local_port=local.port,
                                cloud_port=cloud.port, device_id="demo-gateway",
                                extra=f'[ota]\ntrusted_keys = ["{public}"]\n'
                                'probation_requests = 20\nprobation_latency_factor = 4.0\n')
    agent = AgentProcess(config, work / "agent.log").start()
    store = work / "state" / "agent.db"
    try:
        ready = agent.wait_for_event("agent_ready", 120)
        say(f"agent ready in {ready['startup_s']} s (log: {agent.log_path})")
        sim = Simulator(local.port)

        say(f"1. results flowing: {args.rate} readings/s for 5 s")
        sim.run_for(5, args.rate)
        wait_until(lambda: len(collector.distinct_ids()) >= sim.sent, 60, "results")
        shown = show_results(collector, 0)
        say(f"   {sim.sent} readings published, {len(collector.distinct_ids())} results "
            "received at the cloud")

        say("2. model update: version 2 signed, installed while sensors publish")
        shown = update(work, config, agent, sim, collector, shown, args.rate, "2",
                       make_model(work / "models" / "tiny-v2.gguf", seed=2))
        say("   version 3: valid and signed, but about ten times slower; probation compares "
            "its p95 latency with version 2's (limit: 4x)")
        shown = update(work, config, agent, sim, collector, shown, args.rate, "3",
                       make_model(work / "models" / "slow-v3.gguf", seed=3, n_embd=512,
                                  n_layer=8, n_ff=1024))
        serving = collector.results()[-1]["model"]["version"]
        say(f"   the agent rolled version 3 back by itself; version {serving} serves again")

        say("3. cloud outage: stopping the cloud broker, sensors keep publishing for 5 s")
        cloud.stop()
        before = sim.sent
        sim.run_for(5, args.rate)
        wait_until(lambda: read_counts(store)["inbox"] == 0, 60, "inference of the backlog")
        say(f"   {sim.sent - before} readings during the outage; the outbox holds "
            f"{read_counts(store)['outbox']} results waiting for the cloud")
        say("   cloud broker back")
        started = time.monotonic()
        cloud.start()
        wait_until(lambda: len(collector.distinct_ids()) >= sim.sent, 60, "the backlog")
        say(f"   backlog delivered in {time.monotonic() - started:.1f} s")
        shown = show_results(collector, shown, 3)

        say("4. bad input: a payload that is not JSON")
        publish_readings(local.port, [("sensors/press-1/temperature", b"{celsius: 21")],
                         client_id="demo-sensors")
        wait_until(lambda: bool(collector.results("deadletter")), 30, "the dead letter")
        letter = collector.results("deadletter")[0]
        say(f"   dead-lettered {letter['id'][:8]} from {letter['source']['topic']}: "
            f"{letter['reason']}")

        say("5. graceful stop (SIGTERM)")
        started = time.monotonic()
        code = agent.terminate()
        say(f"   agent exited with {code} in {time.monotonic() - started:.1f} s")
        ids = Counter(body["id"] for body in collector.results())
        lost = sim.sent - len(ids)
        say(f"summary: published={sim.sent} results={len(ids)} "
            f"duplicates={sum(ids.values()) - len(ids)} lost={lost} "
            f"dead_letters={len(collector.results('deadletter'))}")
        return 0 if lost == 0 and code == 0 else 1
    finally:
        agent.kill()
        collector.stop()
        local.stop()
        cloud.stop()


if __name__ == "__main__":
    raise SystemExit(main())
