"""A candidate worker held (SIGSTOP) while the serving worker answers (issue 16): the state of
real llama.cpp worker processes read from /proc, its deadlines that leave out time held, the
bound after which it runs anyway, and an agent stopped in the middle of a hold."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import structlog

from agent.base.records import Generation
from agent.config.settings import ModelSection
from agent.inference.hold import CandidateHold
from agent.inference.supervisor import InferenceWorker, identify
from tests.conftest import Rig
from tests.otakit import keypair, package
from tests.test_ota_agent import Sensors, model_cli, ota_config, steps

MESSAGES = [{"role": "user", "content": "Classify: {\"celsius\": 80}"}]
GENERATION = Generation(16, 0.0, 0, None)


def states(pid: int) -> set[str]:
    """The state letter of every thread of `pid` (field 3 of /proc/<pid>/task/<tid>/stat)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        found.add(stat[stat.rindex(")") + 2])
    return found


def settled(pid: int, stopped: bool, timeout_s: float = 2.0) -> set[str]:
    """The threads' states once each is stopped (T), or none is; signals arrive asynchronously."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = states(pid)
        if (found == {"T"}) if stopped else ("T" not in found):
            return found
        if time.monotonic() > deadline:
            return found
        time.sleep(0.001)


async def worker(model: Path, hold: CandidateHold | None = None, **section: float
                 ) -> InferenceWorker:
    model_section = ModelSection(path=model, n_ctx=256, n_threads=2, **section)
    return InferenceWorker(model_section, await identify(model_section, "tiny"),
                           yield_cpu=hold is not None, hold=hold)


class Probe:
    """Reads the candidate's thread states when the serving worker's request starts and ends,
    before the hold acts on either (it watches the serving worker first)."""

    def __init__(self) -> None:
        self.candidate: InferenceWorker | None = None
        self.at_start: list[set[str]] = []
        self.at_end: list[set[str]] = []

    def request_started(self) -> None:
        assert self.candidate is not None
        self.at_start.append(states(self.candidate.pid or 0))

    def request_ended(self) -> None:
        assert self.candidate is not None
        self.at_end.append(settled(self.candidate.pid or 0, stopped=True))


async def test_a_candidate_is_stopped_while_the_serving_worker_answers_and_runs_otherwise(
    tiny_model: Path,
) -> None:
    """Every thread of the candidate is in state T while the serving worker has a request in
    flight, and none is before and after it; the hold counts each time and the time held."""
    serving = await worker(tiny_model)
    await serving.start()
    probe = Probe()
    serving.watch(probe)  # before the hold: it sees the state the hold leaves
    try:
        with CandidateHold(serving, max_held_s=60) as hold:
            candidate = await worker(tiny_model, hold)
            await candidate.start()
            probe.candidate = candidate
            try:
                for _ in range(3):
                    await serving.complete(MESSAGES, GENERATION)
                    assert "T" not in settled(candidate.pid or 0, stopped=False)
                    await candidate.complete(MESSAGES, GENERATION)  # it answers between them
                print(f"candidate thread states at start {probe.at_start}, at end "
                      f"{probe.at_end}; held {hold.figures()}")
                assert all("T" not in found for found in probe.at_start)
                assert probe.at_end == [{"T"}] * 3
                assert hold.times == 3
                assert hold.held_s > 0
            finally:
                await candidate.close()
        assert candidate.pid is not None
        assert not os.path.exists(f"/proc/{candidate.pid}")  # noqa: ASYNC240 (procfs)
    finally:
        await serving.close()


async def test_time_held_does_not_count_against_the_load_or_request_deadline(
    tiny_model: Path,
) -> None:
    """Held for 4 s from its start, a candidate with a 3 s load deadline still loads; held 3 s
    during a request with a 2 s deadline, it still answers; it was stopped (T) meanwhile."""
    serving = await worker(tiny_model)  # never started: the test stands in for its requests
    loop = asyncio.get_running_loop()
    with CandidateHold(serving, max_held_s=60) as hold:
        candidate = await worker(tiny_model, hold, load_timeout_s=3.0, request_timeout_s=2.0)
        hold.request_started()
        loop.call_later(4.0, hold.request_ended)
        started = time.monotonic()
        loading = asyncio.create_task(candidate.start())
        try:
            await asyncio.sleep(1.0)
            assert candidate._proc is not None
            assert settled(candidate._proc.pid, stopped=True) == {"T"}
            await loading
            assert time.monotonic() - started > 4.0
            assert hold.held_s >= 3.9

            hold.request_started()
            loop.call_later(3.0, hold.request_ended)
            answer = await candidate.complete(MESSAGES, GENERATION)
            assert answer.completion_tokens > 0
            assert hold.held_s >= 6.9
            assert hold.times == 2
            assert not hold.bound_reached
        finally:
            await candidate.close()


async def test_a_candidate_held_past_the_bound_runs_anyway_and_it_is_logged_once(
    tiny_model: Path,
) -> None:
    """With the serving worker answering without a pause, the candidate is held for
    `max_held_s` in all, then runs (never T again) and loads; `candidate_hold_bound_reached`
    is logged once with the figures."""
    serving = await worker(tiny_model)
    with structlog.testing.capture_logs() as logs, \
            CandidateHold(serving, max_held_s=1.0) as hold:
        candidate = await worker(tiny_model, hold)
        hold.request_started()  # and never ended
        try:
            await candidate.start()
            assert "T" not in settled(candidate.pid or 0, stopped=False)
            for _ in range(3):  # the stream goes on: no further hold
                hold.request_ended()
                hold.request_started()
                await candidate.complete(MESSAGES, GENERATION)
                assert "T" not in states(candidate.pid or 0)
            assert hold.bound_reached
            assert hold.times == 1
            assert 0.9 <= hold.held_s <= 1.5
        finally:
            await candidate.close()
    [reached] = [e for e in logs if e["event"] == "candidate_hold_bound_reached"]
    assert reached["max_held_s"] == 1.0
    assert reached["times"] == 1


def agent_children(agent_pid: int) -> dict[int, str]:
    """The agent's child processes and their command lines."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    found = {}
    for child in children:
        try:
            found[int(child)] = Path(f"/proc/{child}/cmdline").read_bytes().decode()
        except FileNotFoundError:
            continue
    return found


def test_an_agent_stopped_in_the_middle_of_a_hold_exits_cleanly_and_leaves_nothing_stopped(
    rig: Rig, tmp_path: Path
) -> None:
    """SIGTERM while the candidate of version 2 is stopped (state T) behind a stream of
    readings: the agent exits 0 and no process of its workers is left, stopped or otherwise."""
    key, public = keypair(tmp_path)
    pkg = package(tmp_path, key, "2", seed=2)
    rig.local.start()
    rig.cloud.start()
    agent = rig.agent(ota_config(rig, public))
    agent.wait_for_event("agent_ready")
    assert agent.proc is not None
    sensors = Sensors(rig.local.port, 0.002)
    sensors.start()
    try:
        assert model_cli("install", str(pkg), "--config", str(agent.config)).returncode == 0
        deadline = time.monotonic() + 60
        held: int | None = None
        workers: set[int] = set()
        while held is None:
            assert time.monotonic() < deadline, "the candidate was never seen stopped"
            assert "switched" not in steps(agent.events()), "promoted before it was seen held"
            for pid, cmdline in agent_children(agent.proc.pid).items():
                workers.add(pid)
                if "agent.inference.priority" in cmdline:
                    try:
                        if states(pid) == {"T"}:
                            held = pid
                    except FileNotFoundError:
                        continue
        asked = time.monotonic()
        assert agent.terminate() == 0
        took_s = time.monotonic() - asked
    finally:
        sensors.stop.set()
        sensors.join(10)
    print(f"candidate {held} stopped at SIGTERM, agent exited in {took_s:.2f} s; "
          f"steps {steps(agent.events())}")
    # Continued before its stdin closed, the candidate read its EOF and exited at once: no
    # kill after close()'s 5 s wait.
    assert took_s < 5.0
    left = {pid: states(pid) for pid in workers if Path(f"/proc/{pid}").exists()}
    # An exited worker may wait as a zombie (Z) for the reaper it was handed to.
    assert all(found == {"Z"} for found in left.values()), left
