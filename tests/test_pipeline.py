"""The pipeline in-process with a real store and a real llama.cpp worker."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agent.base.errors import ModelLoadError
from agent.base.records import Completion, Generation, ModelInfo, Reading
from agent.config.settings import Settings
from agent.flows.pipeline import Pipeline
from agent.inference.supervisor import MAX_BATCH, InferenceWorker, identify
from agent.routing.outbound import Topics
from agent.routing.prompts import build_messages
from agent.store.views import read_counts, read_dead_letters
from agent.store.writer import Store
from tests.conftest import inbox_attempts
from tests.harness import wait_until


def settings(tmp_path: Path, model: Path, max_tokens: int, **model_extra: float) -> Settings:
    return Settings(
        agent={"device_id": "gw", "state_dir": tmp_path},
        model={"path": model, "n_ctx": 256, "n_threads": 1, **model_extra},
        pipeline={"max_attempts": 2, "retry_backoff_s": 0},
        routes=[{
            "name": "t", "topics": ["s/#"], "instruction": "Classify.", "max_tokens": max_tokens,
            "output_schema": {"type": "object", "required": ["level"],
                              "properties": {"level": {"enum": ["normal", "critical"]}}},
        }],
    )


async def rig(cfg: Settings) -> tuple[Store, InferenceWorker, Pipeline]:
    store = await Store.open(cfg.store_path)
    worker = InferenceWorker(cfg.model, await identify(cfg.model, "tiny"))
    await worker.start()
    return store, worker, Pipeline(cfg, store, worker, Topics("edge", "gw"))


READING = Reading("r1", "s/1", b'{"celsius": 99}', 1.0, "t", 0)


def test_an_answer_that_never_fits_the_schema_becomes_a_failed_result_with_raw_text(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Two tokens cannot hold the JSON object: after output_attempts tries the result says
    failed, carries the raw text and the reason, and has no output."""

    async def scenario() -> dict[str, object]:
        store, worker, pipeline = await rig(settings(tmp_path, tiny_model, max_tokens=2))
        try:
            await store.ingest([READING], [])
            leased = await store.lease()
            assert leased is not None
            await pipeline.process(leased)
            rows = await store.pending_outbox(10)
            assert (await store.depths())["inbox"] == 0
            return dict(json.loads(rows[0].payload))
        finally:
            await worker.close()
            await store.close()

    body = asyncio.run(scenario())
    assert body["status"] == "failed"
    assert body["output"] is None
    assert "not strict JSON" in str(body["error"])
    assert isinstance(body["raw"], str)
    assert body["raw"]


def test_a_reading_whose_inference_keeps_hanging_is_dead_lettered_after_max_attempts(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Each attempt hits the deadline (SIGSTOPped worker); the first releases the reading, the
    second (max_attempts = 2) dead-letters it with the reason."""

    async def scenario() -> None:
        # Long enough for a fresh worker's first answer on a loaded machine (the warm-up
        # request below), short enough that the two SIGSTOPped attempts stay quick.
        cfg = settings(tmp_path, tiny_model, max_tokens=32, request_timeout_s=5.0)
        store, worker, pipeline = await rig(cfg)
        try:
            await store.ingest([READING], [])
            for attempt in (1, 2):
                if worker.pid is None or attempt == 2:
                    await worker.complete([{"role": "user", "content": "x"}],
                                          Generation(1, 0, 0, None))
                assert worker.pid is not None
                os.kill(worker.pid, signal.SIGSTOP)
                leased = await store.lease()
                assert leased is not None
                assert leased.attempts == attempt
                await pipeline.process(leased)
            depths = await store.depths()
            assert (depths["inbox"], depths["dead_letter"], depths["outbox"]) == (0, 1, 1)
        finally:
            await worker.close()
            await store.close()

    asyncio.run(scenario())
    [letter] = read_dead_letters(tmp_path / "agent.db")
    assert letter["reason"].startswith("inference failed 2 times")


class PoisonedWorker:
    """The real worker, except that a prompt holding `marker` raises an error nobody foresaw
    (the FAULTS.md "test hook that raises for one reading id")."""

    def __init__(self, worker: InferenceWorker, marker: str) -> None:
        self._worker = worker
        self._marker = marker
        self.raised = 0

    @property
    def info(self) -> ModelInfo:
        return self._worker.info

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[PoisonedWorker]:
        yield self

    async def complete(self, messages: list[dict[str, str]], generation: Generation
                       ) -> Completion:
        if any(self._marker in message["content"] for message in messages):
            self.raised += 1
            raise KeyError("a defect nobody foresaw")
        return await self._worker.complete(messages, generation)


def test_an_unforeseen_exception_on_one_reading_is_an_attempt_then_a_dead_letter(
    tmp_path: Path, tiny_model: Path
) -> None:
    """A reading whose processing raises KeyError is retried as an attempt, dead-lettered after
    max_attempts (2) with the exception named, and the pipeline's run loop goes on to answer
    the readings behind it."""

    async def scenario() -> tuple[int, dict[str, int]]:
        cfg = settings(tmp_path, tiny_model, max_tokens=32)
        store, worker, _ = await rig(cfg)
        poisoned = PoisonedWorker(worker, "poison")
        pipeline = Pipeline(cfg, store, poisoned, Topics("edge", "gw"))
        stop = asyncio.Event()
        try:
            readings = [Reading("bad", "s/1", b'{"celsius": 1, "tag": "poison"}', 1.0, "t", 0)]
            readings += [Reading(f"ok{i}", "s/1", b'{"celsius": %d}' % i, 2.0 + i, "t", 0)
                         for i in range(3)]
            await store.ingest(readings, [])
            task = asyncio.create_task(pipeline.run(stop), name="pipeline")
            await asyncio.to_thread(
                wait_until, lambda: read_counts(cfg.store_path)["inbox"] == 0 or task.done(),
                60, "the inbox drained")
            stop.set()
            store.inbox_changed.set()
            await asyncio.wait_for(task, 30)  # re-raises if the loop died
            return poisoned.raised, await store.depths()
        finally:
            await worker.close()
            await store.close()

    raised, depths = asyncio.run(scenario())
    assert raised == 2
    assert (depths["inbox"], depths["dead_letter"], depths["outbox"]) == (0, 1, 4)
    [letter] = read_dead_letters(tmp_path / "agent.db")
    assert letter["id"] == "bad"
    assert letter["reason"] == ("inference failed 2 times; last: KeyError: "
                                "'a defect nobody foresaw'")


def test_a_reading_leased_more_than_max_attempts_times_is_dead_lettered_without_inference(
    tmp_path: Path, tiny_model: Path
) -> None:
    """A reading that was in hand at each of three crashes (leases that never ended) is, at its
    third lease with max_attempts 2, dead-lettered with that reason and never sent to the
    model again: a reading that crashes the whole agent cannot block the inbox forever."""

    async def scenario() -> dict[str, int]:
        cfg = settings(tmp_path, tiny_model, max_tokens=32)
        store = await Store.open(cfg.store_path)
        await store.ingest([READING], [])
        for _ in range(2):  # leased, then the agent "crashed": reopening frees the lease
            assert await store.lease() is not None
            await store.close()
            store = await Store.open(cfg.store_path)
        try:
            leased = await store.lease()
            assert leased is not None
            assert leased.attempts == 3
            never = PoisonedWorker(None, "")  # type: ignore[arg-type]
            pipeline = Pipeline(cfg, store, never, Topics("edge", "gw"))
            await pipeline.process(leased)
            assert never.raised == 0
            return await store.depths()
        finally:
            await store.close()

    depths = asyncio.run(scenario())
    assert (depths["inbox"], depths["dead_letter"]) == (0, 1)
    [letter] = read_dead_letters(tmp_path / "agent.db")
    assert letter["reason"].startswith("leased 3 times without an outcome (limit 2)")


def test_a_model_that_no_longer_loads_keeps_readings_in_the_inbox_until_it_loads_again(
    tmp_path: Path, tiny_model: Path
) -> None:
    """The model file is truncated and the worker killed: its restart fails (ModelLoadError),
    and the readings stay in the inbox with no attempt counted, none dead-lettered, while the
    pipeline keeps trying. The file is restored: every reading is answered."""
    model = tmp_path / "model.gguf"
    shutil.copy(tiny_model, model)

    async def scenario() -> tuple[list[int], dict[str, int]]:
        cfg = settings(tmp_path, model, max_tokens=32)
        store, worker, pipeline = await rig(cfg)
        stop = asyncio.Event()
        try:
            good = model.read_bytes()
            model.write_bytes(good[: len(good) // 3])
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)
            readings = [Reading(f"r{i}", "s/1", b'{"celsius": %d}' % i, float(i), "t", 0)
                        for i in range(3)]
            await store.ingest(readings, [])
            task = asyncio.create_task(pipeline.run(stop), name="pipeline")
            # Several failed restarts: each would have cost an attempt before.
            await asyncio.to_thread(wait_until, lambda: worker.restarts >= 3 or task.done(),
                                    60, "three restarts that could not load the model")
            assert worker.restarts >= 3
            attempts = inbox_attempts(store.path)
            waiting = await store.depths()
            model.write_bytes(good)
            await asyncio.to_thread(
                wait_until, lambda: read_counts(cfg.store_path)["inbox"] == 0 or task.done(),
                90, "every reading answered after the repair")
            stop.set()
            store.inbox_changed.set()
            await asyncio.wait_for(task, 60)
            assert (await store.depths())["outbox"] == 3
            return attempts, waiting
        finally:
            await worker.close()
            await store.close()

    attempts, waiting = asyncio.run(scenario())
    assert (waiting["inbox"], waiting["dead_letter"]) == (3, 0)
    # The first request may meet the killed worker itself (a crash counts: a reading can cause
    # one) and the lease in hand counts until it is refunded; the failed loads count nothing.
    assert max(attempts) <= 2, attempts
    assert not read_dead_letters(tmp_path / "agent.db")


def test_a_route_whose_wait_is_over_gives_an_idle_pipeline_nothing_to_wake_for(
    tmp_path: Path, tiny_model: Path
) -> None:
    """A parked route wakes the idle pipeline when its wait ends; once over, it stays parked
    until it answers but is no reason to wake: with none of its readings left (dead-lettered,
    or its route removed by a reload), waking for it at once would spin the loop on the store."""
    cfg = settings(tmp_path, tiny_model, max_tokens=8)
    pipeline = Pipeline(cfg, None, None, Topics("edge", "gw"))  # type: ignore[arg-type]
    pipeline._park(cfg.routes[0], ModelLoadError("the model does not load"))
    wake = pipeline._next_unpark()
    assert wake is not None
    assert 0 < wake <= 30.0
    assert pipeline.waiting_routes == {"t": "the model does not load"}
    pipeline._parked["t"].until = time.monotonic() - 1
    assert pipeline._next_unpark() is None
    assert pipeline.waiting_routes == {"t": "the model does not load"}


def test_a_backlog_of_a_local_route_is_decoded_in_batches_and_a_lone_reading_alone(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten readings waiting: the pipeline takes several at once and the worker decodes them
    together (issue 16); each gets its own result, as the same reading does alone. Then one
    reading waiting alone is leased and answered alone. (Batching is off by default: turned on
    here with `[model] max_batch`.)"""

    async def scenario() -> tuple[dict[str, str], dict[str, str], int, int]:
        cfg = settings(tmp_path, tiny_model, max_tokens=24)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"n_ctx": 1024, "max_batch": MAX_BATCH})})
        store = await Store.open(cfg.store_path)
        worker = InferenceWorker(cfg.model, await identify(cfg.model, "tiny"))
        await worker.start()
        pipeline = Pipeline(cfg, store, worker, Topics("edge", "gw"))
        stop = asyncio.Event()
        readings = [Reading(f"r{i}", "s/1", json.dumps({"celsius": 10 * i}).encode(),
                            1.0 + i, "t", 0) for i in range(10)]
        try:
            await store.ingest(readings, [])
            task = asyncio.create_task(pipeline.run(stop), name="pipeline")
            await wait_until_async(lambda: pipeline.completed >= 10)
            batched = worker.batched_requests
            await store.ingest([Reading("lone", "s/1", b'{"celsius": 10}', 20.0, "t", 0)], [])
            await wait_until_async(lambda: pipeline.completed >= 11)
            stop.set()
            await task
            rows = await store.pending_outbox(20)
            outputs = {json.loads(r.payload)["id"]: json.dumps(
                json.loads(r.payload)["output"]) for r in rows}
            # The same readings one at a time, on a worker that never batches.
            alone = InferenceWorker(cfg.model, worker.info, max_batch=1)
            await alone.start()
            try:
                solo_pipeline = Pipeline(cfg, store, alone, Topics("edge", "gw"))
                solo = {}
                for reading in readings:
                    answer = await solo_pipeline._infer(
                        solo_pipeline._routes["t"],
                        build_messages(solo_pipeline._routes["t"], reading.topic,
                                       reading.payload.decode()), reading.id)
                    solo[reading.id] = json.dumps(answer.output)
            finally:
                await alone.close()
            return outputs, solo, batched, worker.batched_requests
        finally:
            stop.set()
            await worker.close()
            await store.close()

    outputs, solo, batched, after = asyncio.run(scenario())
    assert batched >= 2
    assert after == batched  # the lone reading went alone
    assert set(outputs) == {f"r{i}" for i in range(10)} | {"lone"}
    assert {k: outputs[k] for k in solo} == solo


async def wait_until_async(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
