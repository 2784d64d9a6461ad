"""Chaos check: "nothing lost" under repeated SIGKILLs of the agent and cloud broker outages.

Real parts only: a local and a cloud mosquitto on loopback, the agent as a subprocess on a
generated tiny model, the reference cloud consumer (tools/cloud_ingest.py). A publisher sends
`--readings` readings with sequence numbers round-robin on `--streams` sensor topics; meanwhile
the agent is SIGKILLed `--kills` times at random moments and restarted at once, and the cloud
broker is stopped (SIGTERM, it saves its queue) and started again at random. At the end it waits
for the backlog to drain and prints one line:

    chaos: kills=50 cloud_outages=9 published=2000 delivered=2000 lost=0 duplicates=31
           order_violations=0 dead_letters=0 elapsed_s=151.2

`delivered` counts distinct expected ids that reached the consumer (as a result or a dead-letter
report), `duplicates` the copies the consumer dropped by id, `order_violations` the readings of a
stream whose first arrival came after a later reading of the same stream. Exit status 0 only if
lost == 0 and order_violations == 0.

    python tools/chaos.py --kills 50 --readings 2000 --seed 7
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.base.records import reading_id
from tests.harness import AgentProcess, Mosquitto, write_agent_config
from tools.cloud_ingest import CloudIngest, records
from tools.make_tiny_model import make_model

DEVICE_ID = "gw-chaos"


@dataclass
class Summary:
    kills: int
    cloud_outages: int
    published: int
    delivered: int
    lost: int
    duplicates: int
    order_violations: int
    dead_letters: int
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.order_violations == 0

    def line(self) -> str:
        return (f"chaos: kills={self.kills} cloud_outages={self.cloud_outages} "
                f"published={self.published} delivered={self.delivered} lost={self.lost} "
                f"duplicates={self.duplicates} order_violations={self.order_violations} "
                f"dead_letters={self.dead_letters} elapsed_s={self.elapsed_s:.1f}")


def plan(readings: int, streams: int) -> list[tuple[str, bytes]]:
    return [(f"sensors/chaos{i % streams}/temperature",
             json.dumps({"stream": i % streams, "seq": i // streams,
                         "celsius": 20 + i % 30}).encode())
            for i in range(readings)]


class Publisher(threading.Thread):
    """Publishes the plan with QoS 1 in small chunks, waiting for every PUBACK of the local
    broker (which is never disturbed: its losses are outside the agent's guarantee)."""

    def __init__(self, port: int, messages: list[tuple[str, bytes]], duration_s: float) -> None:
        super().__init__(name="chaos-publisher", daemon=True)
        self.port, self.messages, self.duration_s = port, messages, duration_s
        self.published = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="chaos-sensors")
        client.max_inflight_messages_set(100)
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        try:
            chunk = 20
            pause = self.duration_s / max(1, len(self.messages) / chunk)
            for start in range(0, len(self.messages), chunk):
                infos = [client.publish(t, p, qos=1)
                         for t, p in self.messages[start:start + chunk]]
                for info in infos:
                    info.wait_for_publish(timeout=30)
                    if not info.is_published():
                        raise TimeoutError(f"no PUBACK from the local broker for {info.mid}")
                self.published += len(infos)
                time.sleep(pause)
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            client.disconnect()
            client.loop_stop()


def order_violations(bodies: list[dict[str, object]]) -> int:
    """Readings whose first arrival came after a later reading of the same stream."""
    highest: dict[object, int] = {}
    violations = 0
    for body in bodies:
        source = body.get("source")
        payload = source.get("payload") if isinstance(source, dict) else None
        if not isinstance(payload, dict):
            continue
        stream, seq = payload.get("stream"), int(payload.get("seq", -1))
        if seq < highest.get(stream, -1):
            violations += 1
        highest[stream] = max(seq, highest.get(stream, -1))
    return violations


def _drain(expected: set[str], db: Path, stall_timeout_s: float) -> None:
    """Wait until every expected id is at the consumer; give up only when nothing new has
    arrived for `stall_timeout_s` (a slow, shared machine drains slowly but steadily)."""
    seen, last_progress = 0, time.monotonic()
    while True:
        arrived = expected & {rid for rid, _, _ in records(db)}
        if arrived == expected:
            return
        if len(arrived) > seen:
            seen, last_progress = len(arrived), time.monotonic()
        elif time.monotonic() - last_progress > stall_timeout_s:
            raise TimeoutError(f"no progress for {stall_timeout_s:.0f} s with "
                               f"{len(expected) - len(arrived)} readings missing")
        time.sleep(0.5)


def run(kills: int, readings: int, streams: int, seed: int, workdir: Path,
        cloud_outage_chance: float = 0.3, alive_s: tuple[float, float] = (0.3, 2.5),
        drain_timeout_s: float = 60.0, log: bool = True) -> Summary:
    rng = random.Random(seed)
    started = time.monotonic()
    model = make_model(workdir / "tiny.gguf")
    local = Mosquitto("local", workdir).start()
    cloud = Mosquitto("cloud", workdir).start()
    consumer = CloudIngest(workdir / "cloud.db", port=cloud.port).start()
    config = write_agent_config(
        workdir / "agent.toml", state_dir=workdir / "state", model_path=model,
        local_port=local.port, cloud_port=cloud.port, device_id=DEVICE_ID,
    )
    agents: list[AgentProcess] = []
    messages = plan(readings, streams)
    outages = 0
    try:
        agent = AgentProcess(config, workdir / "agent.log").start()
        agents.append(agent)
        # The agent's persistent session must exist before the first reading: a broker drops
        # what matches no subscription (outside the guarantee, see README "Guarantees").
        agent.wait_for_event("agent_ready", 120)
        publisher = Publisher(local.port, messages,
                              duration_s=kills * sum(alive_s) / 2 * 0.8)
        publisher.start()
        for k in range(kills):
            time.sleep(rng.uniform(*alive_s))
            agent.kill()
            if cloud.running and rng.random() < cloud_outage_chance:
                cloud.stop()
                outages += 1
            elif not cloud.running and rng.random() < 0.6:
                cloud.start()
            agent = AgentProcess(config, workdir / "agent.log").start()
            agents.append(agent)
            if log:
                print(f"kill {k + 1}/{kills}: published={publisher.published} "
                      f"cloud={'up' if cloud.running else 'down'} "
                      f"delivered={consumer.counts()['distinct']}", file=sys.stderr)
        if not cloud.running:
            cloud.start()
        publisher.join(timeout=600)
        if publisher.error is not None:
            raise RuntimeError(f"publisher failed: {publisher.error}") from publisher.error
        expected = {reading_id(DEVICE_ID, topic, payload) for topic, payload in messages}
        _drain(expected, consumer.db, drain_timeout_s)
    except TimeoutError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
    finally:
        for agent in agents:
            agent.kill()
        stored = records(consumer.db)
        counts = consumer.counts()
        consumer.stop()
        cloud.stop()
        local.stop()
    expected = {reading_id(DEVICE_ID, topic, payload) for topic, payload in messages}
    delivered = expected & {rid for rid, _, _ in stored}
    return Summary(
        kills=kills,
        cloud_outages=outages,
        published=len(messages),
        delivered=len(delivered),
        lost=len(expected - delivered),
        duplicates=counts["duplicates"],
        order_violations=order_violations([body for _, kind, body in stored
                                           if kind == "results"]),
        dead_letters=sum(1 for _, kind, _ in stored if kind == "deadletter"),
        elapsed_s=time.monotonic() - started,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="agent SIGKILLs (default 10)")
    parser.add_argument("--readings", type=int, default=500)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        summary = run(args.kills, args.readings, args.streams, args.seed, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="edge-chaos-") as tmp:
            summary = run(args.kills, args.readings, args.streams, args.seed, Path(tmp))
    print(summary.line())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
