"""The inference worker's memory limit (RLIMIT_AS), on real llama.cpp."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.base.errors import ModelLoadError
from agent.base.records import Generation
from agent.config.settings import ModelSection
from agent.inference.supervisor import InferenceWorker, identify

MESSAGES = [{"role": "user", "content": "Classify: {\"celsius\": 80}"}]


async def worker_with_limit(model: Path, limit_mb: int) -> InferenceWorker:
    section = ModelSection(path=model, n_ctx=256, n_threads=1, memory_limit_mb=limit_mb)
    worker = InferenceWorker(section, await identify(section, "tiny"))
    await worker.start()
    return worker


def test_the_worker_runs_under_its_address_space_limit(tiny_model: Path) -> None:
    """With a 2 GiB limit the worker's /proc limits show it, and the worker still answers."""

    async def scenario() -> None:
        worker = await worker_with_limit(tiny_model, 2048)
        try:
            limits = await asyncio.to_thread(Path(f"/proc/{worker.pid}/limits").read_text)
            line = next(li for li in limits.splitlines() if li.startswith("Max address space"))
            assert line.split()[3:5] == [str(2048 * 1024 * 1024)] * 2
            completion = await worker.complete(MESSAGES, Generation(8, 0.0, 0, None))
            assert completion.completion_tokens > 0
        finally:
            await worker.close()

    asyncio.run(scenario())


def test_a_limit_too_small_for_the_model_is_a_clear_load_error(tiny_model: Path) -> None:
    """A worker that cannot map the model under its limit reports it; the daemon survives."""

    async def scenario() -> None:
        with pytest.raises(ModelLoadError, match="address space limited to 100 MiB"):
            await worker_with_limit(tiny_model, 100)

    asyncio.run(scenario())

