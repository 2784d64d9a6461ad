"""The inference worker on real llama.cpp: constrained output, deadline, crash and restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path

import pytest

from agent.base.errors import ModelLoadError, WorkerCrashed, WorkerTimeout
from agent.base.records import Generation, ModelInfo
from agent.config.settings import ModelSection
from agent.inference.supervisor import InferenceWorker, identify
from tests.harness import wait_until

SCHEMA = {"type": "object", "properties": {"level": {"enum": ["normal", "warning", "critical"]}},
          "required": ["level"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Classify: {\"celsius\": 80}"}]


async def started(model: Path, **kwargs: float) -> InferenceWorker:
    section = ModelSection(path=model, n_ctx=256, n_threads=1, **kwargs)  # type: ignore[arg-type]
    worker = InferenceWorker(section, await identify(section, "tiny"))
    await worker.start()
    return worker


async def ask(worker: InferenceWorker, seed: int = 0) -> str:
    completion = await worker.complete(MESSAGES, Generation(32, 0.8, seed, SCHEMA))
    return completion.text


def test_schema_constrained_answers_parse(tiny_model: Path) -> None:
    """Twenty sampled answers under the route's schema all parse and satisfy the enum."""

    async def scenario() -> list[str]:
        worker = await started(tiny_model)
        try:
            return [await ask(worker, seed) for seed in range(20)]
        finally:
            await worker.close()

    for text in asyncio.run(scenario()):
        assert json.loads(text)["level"] in ("normal", "warning", "critical")


def test_a_hung_worker_misses_the_deadline_is_killed_and_replaced(tiny_model: Path) -> None:
    """SIGSTOP makes the worker hang: the request fails with WorkerTimeout after the deadline,
    the stopped process is gone, and the next request is served by a new worker."""

    async def scenario() -> None:
        worker = await started(tiny_model, request_timeout_s=1.0)
        try:
            hung = worker.pid
            assert hung is not None
            os.kill(hung, signal.SIGSTOP)
            with pytest.raises(WorkerTimeout):
                await ask(worker)
            with pytest.raises(ProcessLookupError):
                os.kill(hung, 0)
            assert json.loads(await ask(worker))["level"]
            assert worker.pid != hung
            assert worker.restarts == 1
        finally:
            await worker.close()

    asyncio.run(scenario())


def test_a_worker_killed_mid_request_raises_crashed_then_recovers(tiny_model: Path) -> None:
    """A worker SIGKILLed while a request is in flight gives WorkerCrashed, not a hang."""

    async def scenario() -> None:
        worker = await started(tiny_model, request_timeout_s=30.0)
        try:
            pid = worker.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)  # hold the request in flight, then kill
            request = asyncio.ensure_future(ask(worker))
            await asyncio.sleep(0.3)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(WorkerCrashed, match="SIGKILL"):
                await asyncio.wait_for(request, 10)
            assert json.loads(await ask(worker))["level"]
        finally:
            await worker.close()

    asyncio.run(scenario())


def test_a_file_that_is_not_a_gguf_is_refused_with_the_reason(tmp_path: Path) -> None:
    """llama.cpp's refusal reaches the daemon as ModelLoadError; the daemon survives it."""
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + os.urandom(4096))

    async def scenario() -> None:
        with pytest.raises(ModelLoadError, match=r"bogus\.gguf"):
            await started(bogus)

    asyncio.run(scenario())


def test_same_arguments_make_a_byte_identical_model(tmp_path: Path, tiny_model: Path) -> None:
    from tools.make_tiny_model import make_model

    again = make_model(tmp_path / "again.gguf")
    assert again.read_bytes() == tiny_model.read_bytes()
    other = make_model(tmp_path / "other.gguf", seed=1)
    assert other.read_bytes() != tiny_model.read_bytes()


def crashing_model(path: Path) -> Path:
    """A model that loads but aborts llama.cpp on its first token: one float64 norm tensor.
    Written through export's inner writer, since write_gguf itself refuses float64."""
    import numpy as np

    import tools.make_tiny_model as maker
    from agent.specialize import export, recipe, vocab

    cfg = maker.PRESETS["tiny"]
    base = vocab.base_vocab()
    tensors = [(name, arr.astype(np.float64) if name == "output_norm.weight" else arr)
               for name, arr in maker.build_tensors(cfg, len(base.tokens), 0)]
    shape = recipe.Recipe(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_ff=cfg.n_ff, n_ctx=cfg.n_ctx)
    export._write(path, shape, base, tensors, cfg.name)  # type: ignore[arg-type]
    return path


def test_a_worker_that_crashes_on_every_request_backs_off_between_restarts(
    tmp_path: Path, capfd: pytest.CaptureFixture[str],
) -> None:
    """Every request aborts llama.cpp: each fails with WorkerCrashed, the worker is restarted
    each time, and from the second restart on a jittered backoff of at least base/2 separates
    the restarts, so a crash loop cannot spin; ggml's abort attaches no debugger (no gdb, whose
    attach made a crash slow enough to miss the deadline now and then)."""
    from structlog.testing import capture_logs

    model = crashing_model(tmp_path / "crashes.gguf")

    async def scenario() -> InferenceWorker:
        worker = await started(model, request_timeout_s=30.0)
        try:
            for _ in range(4):
                with pytest.raises(WorkerCrashed, match="SIGABRT"):
                    await ask(worker)
            return worker
        finally:
            await worker.close()

    with capture_logs() as logs:
        worker = asyncio.run(scenario())
    delays = [e["delay_s"] for e in logs if e["event"] == "worker_restarting"]
    assert worker.restarts == 3
    assert delays[0] == 0
    assert all(d >= 0.25 for d in delays[1:]), delays
    stderr = capfd.readouterr().err  # the workers inherit this process's fd 2
    assert stderr.count("unsupported types") == 4, stderr  # ggml_abort's message, once a crash
    assert "gdb" not in stderr, stderr


def test_the_worker_gets_both_thread_counts(tiny_model: Path) -> None:
    """n_threads bounds prompt processing too unless n_threads_batch says otherwise: llama.cpp's
    context reports the generation and prompt threads it was given."""

    async def scenario() -> list[tuple[int, int] | None]:
        got = []
        for kwargs in ({}, {"n_threads_batch": 2}):
            worker = await started(tiny_model, **kwargs)
            try:
                got.append(worker.threads)
            finally:
                await worker.close()
        return got

    assert asyncio.run(scenario()) == [(1, 1), (1, 2)]


class WithHelper(InferenceWorker):
    """A worker whose process group also holds a helper it started (a stand-in for a forked
    backtrace helper): `sleep` in the background, detached from the protocol pipes."""

    def command(self) -> list[str]:
        return ["sh", "-c", 'sleep 600 </dev/null >/dev/null 2>&1 & exec "$@"', "sh",
                *super().command()]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def test_a_crash_and_a_close_leave_no_process_of_the_worker_group(
    tmp_path: Path, tiny_model: Path,
) -> None:
    """The worker runs in a process group of its own; after it crashes, and after close(),
    nothing of that group is left running."""
    model = crashing_model(tmp_path / "crashes.gguf")

    async def scenario() -> None:
        for path in (model, tiny_model):
            section = ModelSection(path=path, n_ctx=256, n_threads=1)
            worker = WithHelper(section, await identify(section, "tiny"))
            await worker.start()
            pgid = worker.pid
            assert pgid is not None
            assert len(group_members(pgid)) == 2  # the worker and its helper
            try:
                if path == model:
                    with pytest.raises(WorkerCrashed, match="SIGABRT"):
                        await ask(worker)
                else:
                    assert json.loads(await ask(worker))["level"]
            finally:
                await worker.close()
            await asyncio.to_thread(wait_until, lambda g=pgid: not group_members(g), 30,
                                    f"the group of the worker of {path.name} to be empty")

    asyncio.run(scenario())


def test_a_hung_worker_cannot_hold_a_request_larger_than_the_pipe_past_the_deadline(
    tiny_model: Path,
) -> None:
    """A SIGSTOPped worker reads nothing: a 1 MB request (far over the 64 KiB pipe buffer) still
    fails with WorkerTimeout at the request deadline instead of waiting to be written for ever."""
    big = [{"role": "user", "content": "x" * 1_000_000}]

    async def scenario() -> None:
        worker = await started(tiny_model, request_timeout_s=1.0)
        try:
            hung = worker.pid
            assert hung is not None
            os.kill(hung, signal.SIGSTOP)
            with pytest.raises(WorkerTimeout):
                # The outer bound only turns the old hang into a failure; it is not the deadline.
                await asyncio.wait_for(worker.complete(big, Generation(8, 0.0, 0, None)), 30)
            with pytest.raises(ProcessLookupError):
                os.kill(hung, 0)
        finally:
            await worker.close()

    asyncio.run(scenario())


def test_a_cancelled_request_does_not_leave_its_answer_for_the_next_one(tiny_model: Path) -> None:
    """A request cancelled in flight (its reading's task stopped) is abandoned with its worker:
    the next request gets its own answer from a fresh worker, not the cancelled one's."""

    async def scenario() -> None:
        fresh = await started(tiny_model)
        try:  # the answers a worker gives these seeds (the cancelled request uses seed 0)
            expected = {seed: await ask(fresh, seed) for seed in (1, 2, 3)}
        finally:
            await fresh.close()
        worker = await started(tiny_model, request_timeout_s=30.0)
        try:
            first = worker.pid
            assert first is not None
            os.kill(first, signal.SIGSTOP)  # keep the request in flight
            request = asyncio.ensure_future(ask(worker))
            await asyncio.to_thread(wait_until, lambda: worker.liveness.idle_reason is None,
                                    30, "the request in flight")
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            with contextlib.suppress(ProcessLookupError):
                os.kill(first, signal.SIGCONT)  # if it survived, it answers the cancelled one
            for seed in (1, 2, 3):
                assert await ask(worker, seed) == expected[seed]
            assert worker.pid != first
        finally:
            await worker.close()

    asyncio.run(scenario())


class WithEscapedHelper(InferenceWorker):
    """A worker that leaves behind a helper in a session of its own, holding the worker's pipes:
    out of reach of the group kill, as a forked helper that called setsid would be."""

    def __init__(self, section: ModelSection, info: ModelInfo, pidfile: Path) -> None:
        super().__init__(section, info)
        self.pidfile = pidfile

    def command(self) -> list[str]:
        return ["sh", "-c", f'setsid sleep 600 & echo $! >> {self.pidfile}; exec "$@"', "sh",
                *super().command()]


def test_a_helper_holding_the_worker_pipes_cannot_hold_the_agent(
    tmp_path: Path, tiny_model: Path,
) -> None:
    """A hung worker killed at the deadline while a process outside its group keeps its pipes
    open: the kill does not wait for ever for those pipes to close, the request ends with
    WorkerTimeout, and the next request is served by a new worker."""
    pidfile = tmp_path / "helper.pid"

    async def scenario() -> None:
        section = ModelSection(path=tiny_model, n_ctx=256, n_threads=1, request_timeout_s=2.0)
        worker = WithEscapedHelper(section, await identify(section, "tiny"), pidfile)
        await worker.start()
        try:
            first = worker.pid
            assert first is not None
            os.kill(first, signal.SIGSTOP)
            with pytest.raises(WorkerTimeout):
                # The outer bound only turns the old hang into a failure.
                await asyncio.wait_for(ask(worker), 30)
            assert json.loads(await asyncio.wait_for(ask(worker), 30))["level"]
            assert worker.pid != first
        finally:
            await asyncio.wait_for(worker.close(), 30)

    try:
        asyncio.run(scenario())
    finally:
        for line in pidfile.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line), signal.SIGKILL)
