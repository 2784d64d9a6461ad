"""Model updates through the real agent process: a package handed over with
`edge-agent model install` while sensors publish, and a SIGKILL in the middle of a trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Rig
from tests.harness import CloudCollector, publish_readings, wait_until
from tests.otakit import keypair, package


def ota_config(rig: Rig, public: str, **ota: object) -> Path:
    lines = [f"trusted_keys = [{json.dumps(public)}]", "watch_debounce_s = 0.3"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in ota.items()]
    return rig.config(extra="[ota]\n" + "\n".join(lines) + "\n")


def model_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "model", *args],
                          capture_output=True, text=True, timeout=60)


def steps(agent_events: list[dict[str, object]]) -> list[object]:
    return [e.get("step") for e in agent_events if e.get("event") == "model_update_step"]


class Sensors(threading.Thread):
    """Publishes one reading every `interval_s` until stopped."""

    def __init__(self, port: int, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.port, self.interval_s = port, interval_s
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            payload = json.dumps({"seq": self.sent, "celsius": 20 + self.sent % 70}).encode()
            publish_readings(self.port, [(f"sensors/s{self.sent % 3}/temperature", payload)],
                             client_id="ota-sensors")
            self.sent += 1
            time.sleep(self.interval_s)


def test_a_steady_stream_through_a_successful_swap_loses_and_fails_nothing(
    rig: Rig, tmp_path: Path
) -> None:
    """Sensors publish throughout; `edge-agent model install` hands version 2 to the running
    agent, which verifies, canaries, switches and commits it. Every reading has exactly one ok
    result at the cloud, results go from version 1 to 2 once, the cloud hears every step, and
    the retained status names version 2."""
    key, public = keypair(tmp_path)
    pkg = package(tmp_path, key, "2", seed=2)
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    agent = rig.agent(ota_config(rig, public, probation_requests=15,
                                 probation_latency_factor=20.0))
    agent.wait_for_event("agent_ready")
    sensors = Sensors(rig.local.port, 0.05)
    sensors.start()
    try:
        wait_until(lambda: len(collector.distinct_ids()) >= 20, 60, "results before the swap")
        installed = model_cli("install", str(pkg), "--config", str(agent.config))
        assert installed.returncode == 0, installed.stderr
        wait_until(lambda: "committed" in steps(agent.events())
                   or "rolled_back" in steps(agent.events()), 120, "the verdict")
        at_verdict = sensors.sent
        wait_until(lambda: len(collector.distinct_ids()) >= at_verdict + 10, 60,
                   "results after the swap")
    finally:
        sensors.stop.set()
        sensors.join(10)
    assert steps(agent.events())[-1] == "committed", steps(agent.events())
    wait_until(lambda: len(collector.distinct_ids()) == sensors.sent, 180, "every result")
    results = collector.results()
    assert all(r["status"] == "ok" for r in results)
    assert not collector.results("deadletter")
    versions = [r["model"]["version"] for r in results]
    first_new = versions.index("2")
    assert set(versions[:first_new]) == {"1"}
    assert set(versions[first_new:]) == {"2"}
    told = [body["step"] for topic, body in collector.messages if topic.endswith("events/model")]
    for step in ("received", "verified", "staged", "loaded", "canary_passed", "switched",
                 "probation_started", "committed"):
        assert step in told
    late = CloudCollector(rig.cloud.port, "edge/+/status/model", client_id="late").start()
    wait_until(lambda: bool(late.messages), 10, "the retained status")
    assert late.messages[-1][1]["active"]["version"] == "2"
    late.stop()
    listed = json.loads(model_cli("list", "--json", "--config", str(agent.config)).stdout)
    assert (listed["active"], listed["previous"]) == ("2", "base")
    print(f"swap under a stream: published={sensors.sent} results={len(collector.distinct_ids())} "
          f"v1={versions.count('1')} v2={versions.count('2')}")
    collector.stop()


def test_sigkills_during_the_trial_resume_it_then_roll_back_at_max_trial_starts(
    rig: Rig, tmp_path: Path
) -> None:
    """Version 2 is on probation when the agent is SIGKILLed. With max_trial_starts = 2 the
    first restart resumes the probation (version 2 serving, one start counted); a second
    SIGKILL reaches the limit: the next start makes the previous model active, marks 2 failed
    with the reason, reports it to the cloud, and serves readings with version 1."""
    key, public = keypair(tmp_path)
    pkg = package(tmp_path, key, "2", seed=2)
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    config = ota_config(rig, public, probation_requests=100000, max_trial_starts=2)
    state_file = rig.workdir / "state" / "ota" / "state.json"
    agent = rig.agent(config)
    agent.wait_for_event("agent_ready")
    assert model_cli("install", str(pkg), "--config", str(config)).returncode == 0
    wait_until(lambda: "probation_started" in steps(agent.events()), 60, "the trial")
    state = json.loads(state_file.read_text())
    assert state["active"] == "2"
    assert state["trial"]["phase"] == "probation"
    agent.kill()

    resumed = rig.agent(config)
    assert resumed.wait_for_event("model_answered")["version"] == "2"
    wait_until(lambda: "probation_started" in steps(resumed.events()), 60, "the resumed trial")
    assert "resumed" in steps(resumed.events())
    state = json.loads(state_file.read_text())
    assert (state["active"], state["trial"]["phase"], state["trial"]["starts"]) == (
        "2", "probation", 1)
    assert not state["failed"]
    resumed.kill()

    again = rig.agent(config)
    answered = again.wait_for_event("model_answered")
    assert answered["version"] == "1"
    again.wait_for_event("agent_ready")
    state = json.loads((rig.workdir / "state" / "ota" / "state.json").read_text())
    assert state["active"] == "base"
    assert state["trial"] is None
    assert "started 2 time(s) while version 2 was on trial" in state["failed"]["2"]["reason"]
    publish_readings(rig.local.port, [("sensors/s1/temperature", b'{"seq": 1, "celsius": 30}')])
    wait_until(lambda: len(collector.results()) == 1, 60, "a result after the restart")
    assert collector.results()[0]["model"]["version"] == "1"
    wait_until(lambda: any(body.get("step") == "rolled_back" for topic, body in
                           collector.messages if topic.endswith("events/model")), 30,
               "the rollback report at the cloud")
    collector.stop()


KILL_POINTS = ["received", "verified", "staged", "loaded", "canary_passed", "switched",
               "probation_started", "committed"]


# Between these steps a trial is certainly open, so with max_trial_starts = 1 a kill rolls back.
ROLLED_BACK_AT_1 = {"staged", "loaded", "canary_passed", "switched"}


@pytest.mark.parametrize("max_starts", [1, 2])
@pytest.mark.parametrize("step", KILL_POINTS)
def test_a_sigkill_at_each_step_of_an_update_leaves_one_consistent_active_model(
    rig: Rig, tmp_path: Path, step: str, max_starts: int
) -> None:
    """SIGKILL as soon as the update logs `step`; after a restart, once no trial is open, the
    state file names one active model that is not marked failed, and a reading's result comes
    from exactly that model. With max_trial_starts = 1 (the default) a kill while the trial is
    open rolls it back and fails version 2; with 2 the kill never loses the update: a package
    not yet staged is taken up again from incoming/, a staged one resumes, so version 2 ends
    up active at every step."""
    key, public = keypair(tmp_path)
    pkg = package(tmp_path, key, "2", seed=2)
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    config = ota_config(rig, public, probation_requests=3, max_trial_starts=max_starts)
    agent = rig.agent(config)
    agent.wait_for_event("agent_ready")
    # Readings flow throughout: they feed the probation window, before the kill and after the
    # restart (an update interrupted before staging is picked up again from incoming/).
    sensors = Sensors(rig.local.port, 0.2)
    sensors.start()
    state_file = rig.workdir / "state" / "ota" / "state.json"

    incoming = rig.workdir / "state" / "incoming"

    def settled() -> bool:
        # No trial open and no package waiting: an update interrupted before staging left its
        # package in incoming/, and the restarted agent takes it up again.
        waiting = [p for p in incoming.iterdir() if not p.name.startswith(".")]
        return not waiting and json.loads(state_file.read_text()).get("trial") is None

    try:
        assert model_cli("install", str(pkg), "--config", str(config)).returncode == 0
        wait_until(lambda: step in steps(agent.events()), 90, f"the update's {step} step",
                   interval_s=0.01)
        agent.kill()
        again = rig.agent(config)
        again.wait_for_event("agent_ready", 90)
        wait_until(settled, 120, "no open trial")
        time.sleep(1.5)  # and still so a moment later: not a gap between two update steps
        wait_until(settled, 120, "no open trial, again")
    finally:
        sensors.stop.set()
        sensors.join(10)
    state = json.loads(state_file.read_text())
    active = state["active"]
    assert active not in state.get("failed", {}), state
    if max_starts == 2:
        assert (active, state["failed"]) == ("2", {}), (step, state)
    elif step in ROLLED_BACK_AT_1:
        assert active == "base", (step, state)
        assert "started 1 time(s) while version 2 was on trial" in state["failed"]["2"]["reason"]
    expected = "1" if active == "base" else active
    marker = b'{"seq": 100007, "celsius": 30}'
    publish_readings(rig.local.port, [("sensors/marker/temperature", marker)])

    def marker_results() -> set[str]:
        return {r["model"]["version"] for r in collector.results()
                if r["source"]["payload"].get("seq") == 100007}

    wait_until(lambda: bool(marker_results()), 60, "the marker's result after the restart")
    versions = marker_results()
    assert versions == {expected}, (step, state, versions)
    print(f"killed after {step} (max_trial_starts={max_starts}): active={active} "
          f"failed={sorted(state.get('failed', {}))}")
    collector.stop()


def test_model_rollback_during_probation_switches_back_and_a_second_is_refused(
    rig: Rig, tmp_path: Path
) -> None:
    """`edge-agent model rollback` while version 2 is on probation: the running agent switches
    traffic back to version 1 without waiting for the verdict, marks 2 failed as an operator
    rollback and says so at the cloud; a second rollback has no previous model and is
    refused with the reason, the active model untouched."""
    key, public = keypair(tmp_path)
    pkg = package(tmp_path, key, "2", seed=2)
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    config = ota_config(rig, public, probation_requests=100000)
    agent = rig.agent(config)
    agent.wait_for_event("agent_ready")
    assert model_cli("install", str(pkg), "--config", str(config)).returncode == 0
    wait_until(lambda: "probation_started" in steps(agent.events()), 60, "the trial")
    asked = model_cli("rollback", "--config", str(config))
    assert asked.returncode == 0, asked.stderr
    assert "rolls back to base" in asked.stdout
    wait_until(lambda: "rolled_back" in steps(agent.events()), 60, "the rollback")
    rolled = next(e for e in agent.events() if e.get("step") == "rolled_back")
    assert rolled["reason"] == "operator rollback during probation"
    listed = json.loads(model_cli("list", "--json", "--config", str(config)).stdout)
    assert (listed["active"], listed["previous"], listed["trial"]) == ("base", None, None)
    assert listed["failed"]["2"]["step"] == "probation"
    publish_readings(rig.local.port, [("sensors/s1/temperature", b'{"seq": 1, "celsius": 30}')])
    wait_until(lambda: len(collector.results()) == 1, 60, "a result after the rollback")
    assert collector.results()[0]["model"]["version"] == "1"

    assert model_cli("rollback", "--config", str(config)).returncode == 0
    wait_until(lambda: "rollback_refused" in steps(agent.events()), 60, "the refusal")
    refused = next(e for e in agent.events() if e.get("step") == "rollback_refused")
    assert refused["reason"] == "no previous model to roll back to"
    listed = json.loads(model_cli("list", "--json", "--config", str(config)).stdout)
    assert listed["active"] == "base"

    def told() -> set[object]:
        return {body["step"] for topic, body in collector.messages
                if topic.endswith("events/model")}

    wait_until(lambda: {"rolled_back", "rollback_refused"} <= told(), 30,
               "both reports at the cloud")
    collector.stop()


def test_a_graceful_stop_during_probation_resumes_the_trial_without_counting_a_start(
    rig: Rig, tmp_path: Path
) -> None:
    """SIGTERM (a `systemctl restart`) while version 2 is on probation, default
    max_trial_starts = 1: the agent exits 0 marking the trial stopped, and the next start
    resumes the probation with version 2 serving instead of rolling it back."""
    key, public = keypair(tmp_path)
    pkg = package(tmp_path, key, "2", seed=2)
    rig.local.start()
    rig.cloud.start()
    config = ota_config(rig, public, probation_requests=100000)
    state_file = rig.workdir / "state" / "ota" / "state.json"
    agent = rig.agent(config)
    agent.wait_for_event("agent_ready")
    assert model_cli("install", str(pkg), "--config", str(config)).returncode == 0
    wait_until(lambda: "probation_started" in steps(agent.events()), 60, "the trial")
    assert agent.terminate() == 0
    trial = json.loads(state_file.read_text())["trial"]
    assert (trial["phase"], trial["stopped"], trial["starts"]) == ("probation", True, 0)

    again = rig.agent(config)
    assert again.wait_for_event("model_answered")["version"] == "2"
    wait_until(lambda: "probation_started" in steps(again.events()), 60, "the resumed trial")
    state = json.loads(state_file.read_text())
    assert state["active"] == "2"
    assert (state["trial"]["stopped"], state["trial"]["starts"]) == (False, 0)
    assert not state["failed"]


def test_a_committed_model_that_stops_loading_falls_back_to_the_previous_one(
    rig: Rig, tmp_path: Path
) -> None:
    """Version 2 is committed, then its GGUF is damaged on disk and its worker killed: the
    restart cannot load it, so the agent serves the previous model (base, version 1) by
    itself, marks 2 failed at step `serving`, reports `rolled_back` with the reason, and every
    reading is answered, none dead-lettered."""
    key, public = keypair(tmp_path)
    pkg = package(tmp_path, key, "2", seed=2)
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    config = ota_config(rig, public, probation_requests=3, probation_latency_factor=20.0)
    agent = rig.agent(config)
    agent.wait_for_event("agent_ready")
    assert model_cli("install", str(pkg), "--config", str(config)).returncode == 0
    sensors = Sensors(rig.local.port, 0.05)
    sensors.start()
    try:
        wait_until(lambda: "committed" in steps(agent.events())
                   or "rolled_back" in steps(agent.events()), 120, "the verdict on 2")
        assert "committed" in steps(agent.events()), steps(agent.events())
    finally:
        sensors.stop.set()
        sensors.join(10)
    wait_until(lambda: len(collector.distinct_ids()) == sensors.sent, 60, "results on 2")
    [gguf] = (rig.workdir / "state" / "ota" / "models" / "2").glob("*.gguf")
    with gguf.open("r+b") as handle:  # damaged on disk: the tensor data cut off
        handle.truncate(gguf.stat().st_size // 2)
    worker = [e for e in agent.events() if e.get("event") == "worker_ready"][-1]["pid"]
    os.kill(worker, signal.SIGKILL)
    publish_readings(rig.local.port, [(f"sensors/s{i}/temperature",
                                       json.dumps({"seq": 10_000 + i, "celsius": 40}).encode())
                                      for i in range(5)])
    wait_until(lambda: "rolled_back" in steps(agent.events()), 120, "the fallback")
    rolled = next(e for e in agent.events() if e.get("step") == "rolled_back")
    assert (rolled["version"], rolled["stage"], rolled["active"]) == ("2", "serving", "base")
    assert "does not load while serving" in rolled["reason"]
    wait_until(lambda: len(collector.distinct_ids()) == sensors.sent + 5, 120,
               "the 5 readings answered after the fallback")
    late = [r for r in collector.results() if r["source"]["payload"]["seq"] >= 10_000]
    assert {r["model"]["version"] for r in late} == {"1"}
    assert not collector.results("deadletter")
    listed = json.loads(model_cli("list", "--json", "--config", str(config)).stdout)
    assert listed["active"] == "base"
    assert listed["failed"]["2"]["step"] == "serving"
    collector.stop()
