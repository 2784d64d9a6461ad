"""The edge-agent demo, on real parts: two mosquitto brokers on loopback (the gateway's and a
stand-in for the cloud's), models trained for the demo's route, the agent, and simulated sensors.

It shows, in order: a student model of the temperature route trained by `edge-agent model
specialize` (once per machine: tools/demo_models.py caches it outside the clone) answering
readings, with its accuracy on readings it never trained on; results flowing; a better student
shipped as a signed update carrying its held-out readings as a golden set, canaried and swapped
in while readings flow; a slower version that passes its canary, fails probation and is rolled
back by the agent; a version with random weights refused at the canary for its accuracy on the
golden set; a cloud outage bridged by the SQLite outbox with nothing lost; a malformed
payload dead-lettered with its reason; a graceful stop. Run it with tools/demo.

Every step waits for events (an agent log event, results at the cloud, store counts), never
for a time: the sensors keep publishing until each model update has its verdict, however long
the candidate takes to load on a busy machine. A wait that gives up says what it waited for
and what it saw, and prints the end of the agent's log. The demo owns every process it starts,
and the ones they leave behind (it is their subreaper): none outlives it. Everything stays in
demo-state/ (emptied at each start) for inspection: the agent's log, the store, the brokers'
files, the models served, and cloud-received.jsonl, every message the cloud side received.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.base import signing
from agent.base.errors import StoreUnreadable
from agent.ota import modelpkg
from agent.specialize.rules import Rule, parse_rule
from agent.store.views import read_counts
from tests.harness import AgentProcess, CloudCollector, Mosquitto, write_agent_config
from tools import demo_models
from tools.make_tiny_model import make_model

SENSORS = ["press-1", "oven-2", "cooler-3"]
# Readings published on their own, so that anyone can check the answers against the rule.
CHECKED = [21.5, 72.3, 95.0, 59.0, 86.4]
VERDICTS = ("committed", "rolled_back", "refused", "rejected")
GOLDEN_FLOOR = 0.95  # the least accuracy on its golden set a candidate needs at the canary
LOG_TAIL_LINES = 30
NOTE_EVERY_S = 30.0
# Generous on purpose: a fresh 2-core machine under load starts, loads and answers slowly, and
# every wait ends as soon as its event is there.
START_TIMEOUT_S = 300.0
RESULTS_TIMEOUT_S = 600.0
VERDICT_TIMEOUT_S = 900.0


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


class WaitFailed(Exception):
    """A step of the demo that did not see what it waited for."""


class AgentLog:
    """The agent's JSON log read incrementally (the file grows to megabytes at debug level)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return self.events
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if line.startswith(b"{"):
                try:
                    self.events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return self.events

    def named(self, name: str, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.poll()[since:] if e.get("event") == name]

    def tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last `lines` lines of the log at info level or above (and any line that is not
        JSON, such as a traceback): the debug lines of a busy agent would hide them."""
        if not self.path.exists():
            return [f"({self.path} does not exist)"]
        text = self.path.read_bytes()[-2_000_000:].decode(errors="replace")
        kept = [line for line in text.splitlines() if '"level": "debug"' not in line]
        return kept[-lines:]


class Waits:
    """Every wait of the demo: for what, until when, and what was seen when it gave up."""

    def __init__(self, agent: AgentProcess, log: AgentLog) -> None:
        self.agent = agent
        self.log = log

    def until(self, what: str, predicate: Callable[[], bool], timeout_s: float,
              seen: Callable[[], str] = lambda: "nothing to show",
              agent_running: bool = True) -> float:
        """Poll `predicate` until true; returns the seconds it took. Raises WaitFailed on
        timeout or when the agent exits meanwhile; notes progress every NOTE_EVERY_S."""
        started = time.monotonic()
        note_at = started + NOTE_EVERY_S
        while not predicate():
            now = time.monotonic()
            proc = self.agent.proc
            if agent_running and proc is not None and proc.poll() is not None:
                raise WaitFailed(f"the agent exited with {proc.returncode} while the demo "
                                 f"waited for {what}; seen so far: {seen()}")
            if now - started > timeout_s:
                raise WaitFailed(f"timed out after {timeout_s:.0f} s waiting for {what}; "
                                 f"seen so far: {seen()}")
            if now >= note_at:
                say(f"   ... still waiting for {what} after {now - started:.0f} s: {seen()}")
                note_at += NOTE_EVERY_S
            time.sleep(0.2)
        return time.monotonic() - started

    def event(self, name: str, timeout_s: float, since: int = 0) -> dict[str, Any]:
        self.until(f"the agent's {name} event", lambda: bool(self.log.named(name, since)),
                   timeout_s, lambda: self.last_events())
        return self.log.named(name, since)[0]

    def last_events(self, n: int = 5) -> str:
        """The names of the agent's last `n` events at info level or above."""
        names = [str(e.get("event")) for e in self.log.poll() if e.get("level") != "debug"]
        return f"last agent events {names[-n:]}" if names else "no agent event yet"


class Sensors:
    """Simulated temperature sensors: QoS 1 readings with a sequence number, published from
    one client on the local broker, either `publish(n)` at once or `rate` per second from a
    thread between `start()` and `stop()`. `sent` counts readings the broker acknowledged."""

    def __init__(self, port: int, rate: int) -> None:
        self.rate = rate
        self.sent = 0
        self._rng = random.Random(7)
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        connected = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id="demo-sensors")
        self._client.max_inflight_messages_set(100)
        self._client.on_connect = lambda *args: connected.set()
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        if not connected.wait(30):
            self.close()
            raise WaitFailed(f"timed out after 30 s waiting for the sensors' CONNACK from "
                             f"the local broker on port {port}")

    def publish(self, n: int, values: list[float] | None = None) -> list[int]:
        """Publish `n` readings (at these `values`, if given) and wait for every PUBACK;
        returns their sequence numbers."""
        with self._lock:
            infos: list[paho.MQTTMessageInfo] = []
            first = self.sent
            for index in range(n):
                seq = self.sent + len(infos)
                sensor = SENSORS[seq % len(SENSORS)]
                celsius = (values[index] if values is not None
                           else round(self._rng.uniform(15, 95), 1))
                body = {"sensor": sensor, "seq": seq, "ts": time.time(), "celsius": celsius}
                infos.append(self._client.publish(f"sensors/{sensor}/temperature",
                                                  json.dumps(body).encode(), qos=1))
            for info in infos:
                info.wait_for_publish(timeout=60)
                if not info.is_published():
                    raise WaitFailed(f"timed out after 60 s waiting for the local broker's "
                                     f"PUBACK of message {info.mid}")
            self.sent += n
            return list(range(first, first + n))

    def publish_raw(self, topic: str, payload: bytes) -> None:
        self._client.publish(topic, payload, qos=1).wait_for_publish(timeout=60)

    def start(self) -> None:
        """Publish `rate` readings every second until stop()."""
        self._halt.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="demo-sensors", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tick = time.monotonic()
        try:
            while not self._halt.is_set():
                self.publish(self.rate)
                tick += 1.0  # a slow second is not made up with a burst
                tick = max(tick, time.monotonic() - 1.0)
                self._halt.wait(max(0.0, tick - time.monotonic()))
        except BaseException as exc:  # reported by stop() on the main thread
            self._error = exc

    @property
    def publishing(self) -> bool:
        """False if the thread ended by itself (an error that stop() will raise)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._thread is not None:
            self._halt.set()
            self._thread.join(timeout=120)
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise WaitFailed(f"the sensors stopped publishing: {error!r}") from error

    def close(self) -> None:
        self._halt.set()
        self._client.disconnect()
        self._client.loop_stop()


def outbox_results(store: Path) -> int:
    """Results waiting in the store's outbox, read-only (safe while the agent runs); -1 if
    the store cannot be read right now."""
    try:
        conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT count(*) FROM outbox WHERE kind = 'result'")
                       .fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return -1


def describe(verdict: dict[str, Any]) -> str:
    """An update's verdict event in one line: the step, the reason, the probation figures."""
    text = str(verdict["step"]) + (f" ({verdict['reason']})" if "reason" in verdict else "")
    figures = verdict.get("figures") or {}
    candidate, previous = figures.get("candidate") or {}, figures.get("previous") or {}
    if candidate:
        text += (f"; p95 {candidate.get('p95_ms')} ms over {candidate.get('requests')} "
                 f"requests, the previous model's {previous.get('p95_ms')} ms over "
                 f"{previous.get('requests')}, limit {figures.get('p95_limit_ms')} ms")
    return text + golden_figures(verdict)


def golden_figures(event: dict[str, Any]) -> str:
    """The golden-set figures an update step carries (the candidate's answers to its
    package's golden readings), in words; empty if it has none."""
    sets = (event.get("figures") or {}).get("golden") or []
    return "".join(f"; golden set of route {g.get('route')}: {g.get('right')} of {g.get('n')} "
                   f"right, accuracy {g.get('accuracy')} (floor {g.get('floor')})"
                   for g in sets)


def show_results(collector: CloudCollector, since: int, limit: int = 5) -> int:
    results = collector.results()
    for body in results[since:since + limit]:
        reading = body["source"]["payload"]
        say(f"  result {body['id'][:8]}  {body['source']['topic']:<30} "
            f"{reading['celsius']:>5} C -> {json.dumps(body['output'])}  "
            f"({body['executor']}, {body['latency_ms']} ms, model version "
            f"{body['model']['version']})")
    return len(results)


def agreement(results: list[dict[str, Any]], rule: Rule) -> str:
    """How many of `results` gave the rule's answer, by model version."""
    by_version: dict[str, list[bool]] = {}
    for body in results:
        if body.get("status") == "ok":
            hit = body["output"] == rule.label(body["source"]["payload"])
            by_version.setdefault(str(body["model"]["version"]), []).append(hit)
    return ", ".join(f"version {v}: {sum(h)} of {len(h)} ({sum(h) / len(h):.0%})"
                     for v, h in sorted(by_version.items()))


class Demo:
    """The running parts of one demo and the steps it takes with them."""

    def __init__(self, work: Path, config: Path, agent: AgentProcess, log: AgentLog,
                 collector: CloudCollector, sensors: Sensors, rule: Rule) -> None:
        self.work = work
        self.config = config
        self.agent = agent
        self.log = log
        self.collector = collector
        self.sensors = sensors
        self.rule = rule
        self.waits = Waits(agent, log)
        self.store = work / "state" / "agent.db"

    def progress(self) -> str:
        """What the cloud and the store hold now, for progress notes and failures."""
        received = len(self.collector.distinct_ids())
        try:
            counts = read_counts(self.store)
            store = ", ".join(f"{k}={v}" for k, v in counts.items())
        except StoreUnreadable as exc:
            store = f"unreadable ({exc})"
        return (f"{received} of {self.sensors.sent} readings have results at the cloud; "
                f"store: {store}; {self.waits.last_events(3)}")

    def wait_for_results(self, what: str = "every reading's result at the cloud") -> float:
        return self.waits.until(
            what, lambda: len(self.collector.distinct_ids()) >= self.sensors.sent,
            RESULTS_TIMEOUT_S, self.progress)

    def publish_while(self, what: str, done: Callable[[], bool], timeout_s: float) -> None:
        """Keep the sensors publishing until `done()`, then stop them."""
        self.sensors.start()
        try:
            self.waits.until(what, lambda: done() or not self.sensors.publishing, timeout_s,
                             self.progress)
        finally:
            self.sensors.stop()

    def check(self, values: list[float] = CHECKED) -> None:
        """Publish readings at `values` and print the agent's answers, as the cloud got them,
        beside the rule's."""
        seqs = set(self.sensors.publish(len(values), values))
        self.wait_for_results(f"the results of the {len(values)} readings at "
                              f"{', '.join(f'{v} C' for v in values)}")
        for body in self.collector.results():
            if body["source"]["payload"].get("seq") in seqs:
                reading = body["source"]["payload"]
                level = body["output"].get(self.rule.key) if body["status"] == "ok" else None
                expected = self.rule.label(reading)[self.rule.key]
                say(f"   {reading['celsius']:>5} C -> {level or body['status']:<8} "
                    f"(model version {body['model']['version']}; the rule says {expected}"
                    f"{'' if level == expected else ': WRONG'})")
                seqs.discard(reading["seq"])  # a duplicate delivery is shown once

    def update(self, shown: int, version: str, gguf: Path, expected: str,
               golden: list[tuple[str, Path, float]] | None = None
               ) -> tuple[int, dict[str, Any]]:
        """Sign `gguf` as `version` (with `golden` sets: (route, eval.jsonl, floor)), hand it
        over with `edge-agent model install` while the sensors publish, and keep them
        publishing until the update's verdict, which must be `expected`; prints the update's
        steps and which model answered. Returns `shown` and the verdict event."""
        package = self.work / f"package-v{version}"
        modelpkg.build(gguf, package, name="tiny-test", version=version, n_ctx=512,
                       canary=[{"route": "temperature", "payload": {"celsius": 85.0}}],
                       key=self.work / "release.pem", golden=golden or ())
        seen = len(self.log.poll())
        before = self.sensors.sent

        def steps() -> list[dict[str, Any]]:
            return self.log.named("model_update_step", seen)

        def verdict() -> bool:
            return any(e["step"] in VERDICTS for e in steps())

        def so_far() -> str:
            names = [e["step"] for e in steps()]
            return (f"update steps {names}; {self.sensors.sent - before} readings published "
                    f"since the install; {self.progress()}")

        self.sensors.start()
        try:
            install = subprocess.run(
                [sys.executable, "-m", "agent", "model", "install", str(package),
                 "--config", str(self.config)],
                capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False)
            if install.returncode != 0:
                raise WaitFailed(f"`edge-agent model install` exited with "
                                 f"{install.returncode}: {install.stderr.strip()[-2000:]}")
            self.waits.until(f"version {version}'s verdict (one of {', '.join(VERDICTS)})",
                             lambda: verdict() or not self.sensors.publishing,
                             VERDICT_TIMEOUT_S, so_far)
        finally:
            self.sensors.stop()
        for event in steps():
            say(f"   model {event.get('version', event.get('package'))}: "
                + (describe(event) if event["step"] in VERDICTS else event["step"]
                   + (f" ({event['reason']})" if "reason" in event else "")
                   + golden_figures(event)))
        final = next(e for e in steps() if e["step"] in VERDICTS)
        if final["step"] != expected:
            raise WaitFailed(f"version {version} was {describe(final)}; the demo expected "
                             f"{expected}")
        self.wait_for_results()
        results = self.collector.results()[shown:]
        versions = Counter(body["model"]["version"] for body in results)
        say(f"   {self.sensors.sent - before} readings during the update, results by model "
            f"version: {dict(versions)}, failed: "
            f"{sum(body['status'] != 'ok' for body in results)}; answered as the rule says: "
            f"{agreement(results, self.rule)}")
        return len(self.collector.results()), final

    def answered_by(self, n: int = 3) -> set[str]:
        """Publish `n` readings now; the model versions that answered them."""
        first = self.sensors.sent
        self.sensors.publish(n)
        self.wait_for_results(f"the results of {n} readings published after the verdict")
        return {body["model"]["version"] for body in self.collector.results()
                if body["source"]["payload"]["seq"] >= first}


def children() -> dict[int, str]:
    """This process's live child processes: pid -> command line."""
    found = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == me and fields[0] != "Z":
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def end_processes(pids: dict[int, str]) -> None:
    """SIGTERM, then SIGKILL after 10 s, each of `pids` (orphans the demo adopted), and reap."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid in children() for pid in pids):
            time.sleep(0.1)
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue


def adopt_orphans() -> None:
    """Become a child subreaper (Linux prctl PR_SET_CHILD_SUBREAPER): a process that one of
    the demo's children leaves behind (an inference worker, a debugger) is re-parented to the
    demo rather than to PID 1, so the demo can see it and end it."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except AttributeError:  # not Linux
        say("warning: cannot adopt orphaned processes here (no prctl)")
        return
    if prctl(36, 1, 0, 0, 0) != 0:  # 36: PR_SET_CHILD_SUBREAPER, linux/prctl.h
        say(f"warning: cannot adopt orphaned processes (prctl: {os.strerror(ctypes.get_errno())})")


def users_of(work: Path) -> dict[int, str]:
    """Processes an earlier demo in `work` started and left running (it was SIGKILLed, say):
    its brokers, agent and inference workers, recognised by the paths in their command lines."""
    marks = (f"{work}/mosquitto-", f"{work}/agent.toml", f"--model {work}/")
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace")
            except OSError:
                continue
            if any(mark in cmdline for mark in marks):
                found[int(entry.name)] = cmdline
    return found


def stop_on_sigterm() -> None:
    """SIGTERM ends the demo through its `finally` blocks, as Ctrl-C does."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("demo-state"),
                        help="where brokers, model, store and logs go (emptied first)")
    parser.add_argument("--rate", type=int, default=20, help="readings per second")
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    stale = users_of(work)
    if stale:
        for pid, cmdline in stale.items():
            say(f"still running from an earlier demo: pid {pid}: {cmdline}")
        say(f"stop those processes first: they use {work}")
        return 2
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    stop_on_sigterm()
    adopt_orphans()
    started = time.monotonic()
    try:
        return run(work, args.rate)
    except KeyboardInterrupt:
        say("interrupted; stopping what the demo started")
        return 130
    finally:
        leftovers = children()
        if leftovers:
            for pid, cmdline in leftovers.items():
                say(f"ending a process left behind: pid {pid}: {cmdline}")
            end_processes(leftovers)
        say(f"demo took {time.monotonic() - started:.0f} s")


def describe_student(student: demo_models.Student) -> str:
    made = ("from the cache" if student.train_s is None
            else f"trained in {student.train_s:.0f} s")
    return (f"a student of {student.steps} training steps ({made}): accuracy "
            f"{student.accuracy:.3f} on its {student.n_eval} held-out readings "
            f"({demo_models.QUANT}, answered through llama.cpp)")


def run(work: Path, rate: int) -> int:
    say(f"working in {work}")
    models = work / "models"
    models.mkdir()
    public = signing.generate(work / "release.pem")
    local = Mosquitto("local", work)
    cloud = Mosquitto("cloud", work)
    v1 = models / "student-v1.gguf"
    config = write_agent_config(work / "agent.toml", state_dir=work / "state",
                                model_path=v1, local_port=local.port,
                                cloud_port=cloud.port, device_id="demo-gateway",
                                extra=f'[ota]\ntrusted_keys = ["{public}"]\n'
                                'probation_requests = 20\nprobation_latency_factor = 4.0\n'
                                'golden_max_items = 300\n')
    route = demo_models.route_of(config)
    say(f"the models: students of route {route.name} ({route.instruction!r}) taught by the "
        f"rule {demo_models.RULE!r}")
    try:
        quick, better = demo_models.students(config, [demo_models.QUICK, demo_models.BETTER],
                                             say=say)
    except demo_models.TrainExtraMissing as exc:
        say(f"FAILED: {exc}")
        return 1
    shutil.copyfile(quick.gguf, v1)
    shutil.copyfile(better.gguf, models / "student-v2.gguf")
    shutil.copyfile(better.eval_set, models / "golden-temperature.jsonl")
    say(f"version 1: {describe_student(quick)}")
    say(f"version 2: {describe_student(better)}")
    v3 = make_model(models / "slow-v3.gguf", seed=3, n_embd=512, n_layer=8, n_ff=1024)
    say(f"version 3: a generated model with random weights, {v3.stat().st_size // 1024} KiB")
    agent = AgentProcess(config, work / "agent.log")
    log = AgentLog(agent.log_path)
    collector: CloudCollector | None = None
    sensors: Sensors | None = None
    try:
        local.start(timeout_s=60)
        cloud.start(timeout_s=60)
        say(f"local broker on 127.0.0.1:{local.port}, cloud broker on 127.0.0.1:{cloud.port}")
        collector = CloudCollector(cloud.port, client_id="demo-cloud-consumer").start()
        agent.start()
        sensors = Sensors(local.port, rate)
        demo = Demo(work, config, agent, log, collector, sensors,
                    parse_rule(demo_models.RULE, route))
        return steps(demo, local, cloud, rate, better)
    except (WaitFailed, TimeoutError, RuntimeError) as exc:
        say(f"FAILED: {exc}")
        say(f"last {LOG_TAIL_LINES} lines of {log.path} (debug lines left out):")
        for line in log.tail():
            print(f"    {line[:400]}", flush=True)
        return 1
    finally:
        if sensors is not None:
            sensors.close()
        agent.kill()
        if collector is not None:
            collector.stop()
            with (work / "cloud-received.jsonl").open("w") as out:
                for topic, body in collector.messages:
                    out.write(json.dumps({"topic": topic, "body": body}) + "\n")
        local.stop()
        cloud.stop()


def steps(demo: Demo, local: Mosquitto, cloud: Mosquitto, rate: int,
          better: demo_models.Student) -> int:
    agent, sensors, collector, waits = demo.agent, demo.sensors, demo.collector, demo.waits
    ready = waits.event("agent_ready", START_TIMEOUT_S)
    say(f"agent ready in {ready['startup_s']} s, serving version 1 (log: {agent.log_path})")

    say(f"1. results flowing: {rate} readings/s until {5 * rate} are published")
    demo.publish_while(f"{5 * rate} readings published", lambda: sensors.sent >= 5 * rate,
                       RESULTS_TIMEOUT_S)
    demo.wait_for_results()
    shown = show_results(collector, 0)
    say(f"   {sensors.sent} readings published, {len(collector.distinct_ids())} results "
        f"received at the cloud; answered as the rule says: "
        f"{agreement(collector.results(), demo.rule)}")
    say("   readings to check by eye, and the agent's answers as the cloud received them:")
    demo.check()

    say(f"2. model update: version 2, the better student, signed with its "
        f"{better.n_eval} held-out readings as the golden set (floor {GOLDEN_FLOOR}), "
        f"installed while sensors publish")
    golden = [("temperature", demo.work / "models" / "golden-temperature.jsonl", GOLDEN_FLOOR)]
    shown, _ = demo.update(shown, "2", demo.work / "models" / "student-v2.gguf", "committed",
                           golden=golden)
    canary = [e for e in demo.log.named("model_update_step")
              if e["step"] == "canary_passed" and e.get("version") == "2"]
    say(f"   version 2 at the agent's canary{golden_figures(canary[-1]) if canary else ''}; "
        f"at training, {better.accuracy:.3f} on the same {better.n_eval} readings")
    demo.check()
    shown = len(collector.results())
    say("   version 3: valid and signed, but a larger model with random weights, many times "
        "slower per request; probation compares its p95 latency with version 2's (limit: 4x)")
    shown, verdict = demo.update(shown, "3", demo.work / "models" / "slow-v3.gguf",
                                 "rolled_back")
    serving = demo.answered_by(3)
    say(f"   the agent rolled version 3 back by itself; readings published now are answered "
        f"by version {', '.join(sorted(serving))} (the agent says {verdict['active']})")
    say("   version 4: signed, fast, but random weights, shipped with version 2's golden set: "
        "the canary asks it the golden readings")
    shown, verdict = demo.update(shown, "4", make_model(demo.work / "models" / "random-v4.gguf",
                                                       seed=4), "refused", golden=golden)
    serving = demo.answered_by(3)
    say(f"   the agent refused version 4 at the canary; readings are answered by version "
        f"{', '.join(sorted(serving))}")

    say(f"3. cloud outage: stopping the cloud broker, sensors keep publishing until "
        f"{5 * rate} more readings are in")
    cloud.stop()
    before = sensors.sent
    demo.publish_while(f"{5 * rate} readings published during the outage",
                       lambda: sensors.sent - before >= 5 * rate, RESULTS_TIMEOUT_S)
    during = sensors.sent - before
    waits.until(f"the results of the {during} readings in the outbox",
                lambda: outbox_results(demo.store) >= during, RESULTS_TIMEOUT_S, demo.progress)
    say(f"   {during} readings during the outage; the outbox holds "
        f"{outbox_results(demo.store)} results waiting for the cloud")
    say("   cloud broker back")
    cloud.start(timeout_s=60)
    took = demo.wait_for_results("the backlog at the cloud")
    say(f"   backlog delivered in {took:.1f} s")
    shown = show_results(collector, shown, 3)

    say("4. bad input: a payload that is not JSON, and JSON whose number overflows a double")
    sensors.publish_raw("sensors/press-1/temperature", b"{celsius: 21")
    sensors.publish_raw("sensors/oven-2/temperature", b'{"seq": -1, "celsius": 1e400}')
    waits.until("the 2 dead letters at the cloud",
                lambda: len(collector.results("deadletter")) >= 2, RESULTS_TIMEOUT_S,
                demo.progress)
    for letter in collector.results("deadletter"):
        say(f"   dead-lettered {letter['id'][:8]} from {letter['source']['topic']}: "
            f"{letter['reason']}")

    say("5. graceful stop (SIGTERM)")
    started = time.monotonic()
    try:
        code = agent.terminate(timeout_s=60)
    except subprocess.TimeoutExpired as exc:
        raise WaitFailed("timed out after 60 s waiting for the agent to exit after "
                         f"SIGTERM; {waits.last_events()}") from exc
    say(f"   agent exited with {code} in {time.monotonic() - started:.1f} s")
    brokers = {p.pid for p in (local.proc, cloud.proc) if p is not None}
    orphans = {pid: cmd for pid, cmd in children().items() if pid not in brokers}
    for pid, cmdline in orphans.items():
        say(f"   the agent left a process behind: pid {pid}: {cmdline}")
    ids = Counter(body["id"] for body in collector.results())
    lost = sensors.sent - len(ids)
    say(f"summary: published={sensors.sent} results={len(ids)} "
        f"duplicates={sum(ids.values()) - len(ids)} lost={lost} "
        f"dead_letters={len(collector.results('deadletter'))}")
    return 0 if lost == 0 and code == 0 and not orphans else 1


if __name__ == "__main__":
    raise SystemExit(main())
