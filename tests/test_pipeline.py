"""The pipeline in-process with a real store and a real llama.cpp worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

from agent.config import Settings
from agent.inference import InferenceWorker, identify
from agent.messages import Topics
from agent.pipeline import Pipeline
from agent.records import Generation, Reading
from agent.store import Store
from agent.storeviews import read_dead_letters


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
