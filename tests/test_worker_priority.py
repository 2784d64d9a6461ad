"""A candidate worker's CPU priority (issue 16): SCHED_IDLE while it loads and answers, every
thread back under SCHED_OTHER after `end_yield`, read from /proc of real llama.cpp workers; the
refusal when the process could not come back; and the rule that decides it."""

from __future__ import annotations

import os
import resource
import shutil
from pathlib import Path

import pytest
import structlog

from agent.base.records import Generation, ModelInfo
from agent.config.settings import ModelSection
from agent.inference import priority
from agent.inference.supervisor import InferenceWorker, identify

MESSAGES = [{"role": "user", "content": "Classify: {\"celsius\": 80}"}]
GENERATION = Generation(8, 0.0, 0, None)

# The workers this process starts have its credentials and limits.
needs_yield = pytest.mark.skipif(priority.round_trip_refusal() is not None,
                                 reason="this process may not leave SCHED_IDLE")


def test_leaving_idle_is_allowed_by_a_nice_limit_of_20_minus_nice() -> None:
    """can_nice(): RLIMIT_NICE 20 allows nice 0 back, 15 allows nice 5, and a refusal names the
    LimitNICE= value that would allow it."""
    assert priority.return_refusal(0, 20) is None
    assert priority.return_refusal(5, 15) is None
    assert priority.return_refusal(0, resource.RLIM_INFINITY) is None
    refused = priority.return_refusal(0, 0)
    assert refused is not None
    assert "RLIMIT_NICE >= 20" in refused
    assert "LimitNICE=+0" in refused
    refused = priority.return_refusal(5, 10)
    assert refused is not None
    assert "LimitNICE=+5" in refused


def test_only_a_candidate_worker_is_started_to_yield(tiny_model: Path) -> None:
    """A candidate starts through agent.inference.priority (idle before the worker's imports);
    every other worker starts the worker module directly."""
    section = ModelSection(path=tiny_model, n_ctx=256)
    info = ModelInfo(name="tiny", version="1", sha256="0" * 64, path=str(tiny_model))
    assert "agent.inference.priority" in InferenceWorker(section, info, yield_cpu=True).command()
    assert "agent.inference.priority" not in InferenceWorker(section, info).command()


async def started(model: Path, yield_cpu: bool) -> InferenceWorker:
    section = ModelSection(path=model, n_ctx=256, n_threads=2)
    worker = InferenceWorker(section, await identify(section, "tiny"), yield_cpu=yield_cpu)
    await worker.start()
    return worker


@needs_yield
async def test_a_candidate_answers_under_sched_idle_and_serves_under_sched_other(
    tiny_model: Path,
) -> None:
    """Every thread of a candidate worker, llama.cpp's included, is under SCHED_IDLE after its
    load and an answer; after end_yield every thread is under SCHED_OTHER, and stays so
    through the next answers and a restart."""
    worker = await started(tiny_model, yield_cpu=True)
    try:
        assert worker.scheduling == "idle"
        await worker.complete(MESSAGES, GENERATION)
        policies = priority.thread_policies(worker.pid or 0)
        print(f"candidate threads: {policies}")
        assert len(policies) > 1
        assert set(policies.values()) == {priority.SCHED_IDLE}
        await worker.end_yield()
        assert worker.scheduling == "normal"
        assert set(priority.thread_policies(worker.pid or 0).values()) == {priority.SCHED_OTHER}
        await worker.complete(MESSAGES, GENERATION)
        assert set(priority.thread_policies(worker.pid or 0).values()) == {priority.SCHED_OTHER}
        assert "agent.inference.priority" not in worker.command()  # a restart: normal
    finally:
        await worker.close()


async def test_a_serving_worker_never_goes_idle(tiny_model: Path) -> None:
    """A worker started without yield_cpu (the base model, a rollback) answers under
    SCHED_OTHER, and end_yield leaves it alone."""
    worker = await started(tiny_model, yield_cpu=False)
    try:
        await worker.complete(MESSAGES, GENERATION)
        assert worker.scheduling == "normal"
        await worker.end_yield()
        assert set(priority.thread_policies(worker.pid or 0).values()) == {priority.SCHED_OTHER}
    finally:
        await worker.close()


class WithoutSysNice(InferenceWorker):
    """A worker whose process has no CAP_SYS_NICE and this process's RLIMIT_NICE (0 here): as
    under a unit without LimitNICE=."""

    def command(self) -> list[str]:
        return ["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice",
                *super().command()]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None
                    or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20,
                    reason="needs root, setpriv and RLIMIT_NICE below 20")
async def test_a_candidate_that_could_not_come_back_loads_at_normal_priority(
    tiny_model: Path,
) -> None:
    """Without CAP_SYS_NICE or the nice limit the candidate does not go idle (it could never
    leave): it answers under SCHED_OTHER and the agent warns once, naming LimitNICE=."""
    section = ModelSection(path=tiny_model, n_ctx=256, n_threads=2)
    worker = WithoutSysNice(section, await identify(section, "tiny"), yield_cpu=True)
    with structlog.testing.capture_logs() as logs:
        await worker.start()
    try:
        assert worker.scheduling == "normal"
        [warning] = [e for e in logs if e["event"] == "candidate_not_yielding"]
        assert "LimitNICE=+" in warning["reason"]  # +N for the nice N the test runs at
        assert "LimitNICE=+0" in warning["fix"]
        await worker.complete(MESSAGES, GENERATION)
        assert set(priority.thread_policies(worker.pid or 0).values()) == {priority.SCHED_OTHER}
        await worker.end_yield()
    finally:
        await worker.close()
