"""Supervision of the inference worker process (agent/inference/worker.py) from the daemon's event
loop.

Owns the child process: start, per-request deadline, kill and restart after a hang or crash with
a backoff against crash loops, and shutdown. It never imports llama_cpp; the worker does.

Each worker runs in a session (and process group) of its own, and every kill goes to the whole
group: nothing the worker started (a forked backtrace helper, say) outlives it. A model that stops
loading while the agent serves (the file damaged on disk, a load past its deadline) makes the
worker unavailable: not answering, reported once as `model_unavailable`, the restart retried at the
next request after a backoff, and `model_recovered` when it answers again. The pipeline keeps the
readings in the inbox meanwhile (ModelLoadError is agent/errors.Unavailable).

Requests that arrive while the worker is busy wait together and go to it as one batch line, up to
`[model] max_batch` (8 by default; issue 16: a backlog is decoded several readings at once,
agent/inference/batch.py);
a request that finds the worker idle goes alone at once, so latency at low load does not grow.
The batch forms here, from concurrent callers, rather than in the pipeline: each reading keeps
its own retries, schema checks and commit, and callers need not know about batching.

A candidate worker (`yield_cpu`, agent/ota/updates.py) loads and answers its canary under
SCHED_IDLE (agent/inference/priority.py) so that it does not delay the serving worker's
readings; `end_yield` returns it to normal priority before it serves, and a restart after that
starts it at normal priority. Its `hold` (agent/inference/hold.py) stops it while the serving
worker, which it `watch`es, has a request in flight; its deadlines then stand still, and the
hold ends (SIGCONT) before anything here waits for the process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from agent.base.digest import sha256_file
from agent.base.errors import ModelLoadError, PermanentError, WorkerCrashed, WorkerTimeout
from agent.base.liveness import Liveness
from agent.base.records import Completion, Generation, ModelInfo
from agent.base.retry import Backoff
from agent.config.settings import ModelSection

log = structlog.get_logger()

# A response line holds a generation; well above any max_tokens the config allows.
_LINE_LIMIT = 16 * 1024 * 1024
# How long a dead (or SIGKILLed) worker may take to be reaped before we go on without it.
_REAP_TIMEOUT_S = 5.0
# Requests decoded together at most: llama-server's order of parallel slots. Each sequence's
# prompt and answer take KV cells of the one context, so the worker decodes fewer at once when
# they do not fit (agent/inference/worker.py), never more.
# `[model] max_batch` (1 to 8) chooses; a batch evaluates only what its readings' prompts do
# not share with the sequences kept from earlier batches (agent/inference/batch.py), which is what
# makes it pay; a request that finds the worker idle still goes alone.
MAX_BATCH = 8


@dataclass(slots=True)
class _Waiting:
    """A request waiting for the worker, and where its reply (or failure) goes."""

    request: dict[str, Any]
    reply: asyncio.Future[dict[str, Any]]


class RequestWatcher(Protocol):
    """Told when a request line goes to the worker and when its answer is back."""

    def request_started(self) -> None: ...

    def request_ended(self) -> None: ...


class Hold(Protocol):
    """Who stops a candidate worker's process group from outside (agent/inference/hold.py)."""

    @property
    def held_s(self) -> float: ...

    def attach(self, pid: int) -> None: ...

    def detach(self) -> None: ...

    def end(self) -> None: ...

    def deadline(self, delay_s: float) -> AbstractAsyncContextManager[object]: ...


class InferenceFailed(PermanentError):
    """The worker answered but could not run this request (for example a prompt too long)."""


class PriorityNotRestored(PermanentError):
    """A candidate worker could not return from SCHED_IDLE: it must not serve."""


async def identify(model: ModelSection, name: str) -> ModelInfo:
    """Name, version and sha256 of the configured model; hashing runs off the loop."""
    if not await asyncio.to_thread(model.path.is_file):
        raise ModelLoadError(f"model file {model.path} does not exist")
    sha256 = await asyncio.to_thread(sha256_file, model.path)
    return ModelInfo(name=name, version=model.version, sha256=sha256, path=str(model.path))


class InferenceWorker:
    """One llama.cpp worker process serving one request at a time."""

    def __init__(self, model: ModelSection, info: ModelInfo,
                 max_batch: int | None = None, yield_cpu: bool = False,
                 hold: Hold | None = None) -> None:
        self.info = info
        self._yield_cpu = yield_cpu
        self._hold = hold
        # A request line written and its answer not yet read, and who is told of each.
        self.in_flight = False
        self._watchers: list[RequestWatcher] = []
        # What the worker reported: "idle" (SCHED_IDLE, a candidate) or "normal".
        self.scheduling: str | None = None
        self._model = model
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        # The model section's max_batch unless the caller (the bench) says otherwise.
        self.max_batch = model.max_batch if max_batch is None else max_batch
        self._waiting: deque[_Waiting] = deque()
        # Requests sent in batches of more than one, for the bench and the tests.
        self.batched_requests = 0
        self._ids = itertools.count(1)
        self._backoff = Backoff(0.5, 30.0)
        self.restarts = 0
        self.pid: int | None = None
        self.liveness = Liveness("inference_worker")
        # Readiness: the model loaded and its last request (or the load) succeeded.
        self.answering = False
        # Threads llama.cpp's context got: (per generated token, for the prompt).
        self.threads: tuple[int, int] | None = None
        # While serving: why the model does not load now (None while it does), and since when.
        self.unavailable: str | None = None
        self.load_failures = 0
        self._unavailable_since = 0.0
        # Set while the model does not load (agent/ota/updates.py falls back to an earlier model).
        self.went_unavailable = asyncio.Event()

    def command(self) -> list[str]:
        """The worker's command line; a candidate's goes idle first
        (agent/inference/priority.py)."""
        module = "agent.inference.priority" if self._yield_cpu else "agent.inference.worker"
        args = [sys.executable, "-m", module, "--model", self.info.path,
                "--n-ctx", str(self._model.n_ctx), "--seed", str(self._model.seed),
                "--parent-pid", str(os.getpid())]
        if self._model.n_threads:
            args += ["--n-threads", str(self._model.n_threads)]
        if self._model.threads_batch:
            args += ["--n-threads-batch", str(self._model.threads_batch)]
        if self._model.memory_limit_mb:
            args += ["--memory-limit-mb", str(self._model.memory_limit_mb)]
        if self.max_batch > 1:
            args += ["--max-batch", str(self.max_batch)]
        return args

    async def start(self) -> None:
        """Start the worker and wait until the model is loaded; ModelLoadError if it is refused."""
        self.liveness.busy()
        # A session of its own: the group can be killed whole, and a Ctrl-C meant for the
        # agent does not reach the worker (the agent stops it itself).
        proc = await asyncio.create_subprocess_exec(
            *self.command(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=_LINE_LIMIT, start_new_session=True,
        )
        self._proc = proc
        if self._hold is not None:
            self._hold.attach(proc.pid)
        try:
            async with self._deadline(self._model.load_timeout_s):
                hello = await self._read(proc)
        except (TimeoutError, WorkerCrashed) as exc:
            self.liveness.idle("model failed to load")
            await self._kill()
            raise ModelLoadError(f"worker did not load {self.info.path}: {exc!r}") from exc
        if hello.get("event") != "ready":
            self.liveness.idle("model failed to load")
            await self._kill()
            raise ModelLoadError(f"llama.cpp refused {self.info.path}: {hello.get('error')}")
        self.pid = proc.pid
        self.answering = True
        self.threads = (int(hello.get("threads", 0)), int(hello.get("threads_batch", 0)))
        self.scheduling = str(hello.get("scheduling", "normal"))
        self.liveness.idle("no request")
        log.info("worker_ready", pid=proc.pid, model=self.info.name,
                 load_ms=round(float(hello.get("load_ms", 0)), 1),
                 threads=self.threads[0], threads_batch=self.threads[1],
                 scheduling=self.scheduling)
        if self._yield_cpu and self.scheduling != "idle":
            log.warning("candidate_not_yielding", pid=proc.pid, model=self.info.name,
                        reason=hello.get("yield_refused"),
                        effect="the candidate loads and answers its canary at normal priority, "
                        "competing with live readings",
                        fix="LimitNICE=+0 and SystemCallFilter=sched_setscheduler in the unit "
                        "(systemd/edge-agent.service)")

    async def end_yield(self) -> None:
        """Return a worker under SCHED_IDLE to normal priority, every thread of it, before it
        serves; a worker at normal priority already is left alone. PriorityNotRestored if the
        worker could not (it must not serve then); WorkerCrashed if it is gone."""
        self._end_hold()
        if self.scheduling != "idle":
            self._yield_cpu = False
            return
        async with self._lock:
            proc = self._proc
            if proc is None or proc.returncode is not None or _pipes_closed(proc):
                raise WorkerCrashed("the candidate worker is gone")
            request_id = next(self._ids)
            try:
                reply = await asyncio.wait_for(
                    self._exchange(proc, {"id": request_id, "control": "normal"}),
                    self._model.request_timeout_s)
            except (TimeoutError, BrokenPipeError, ConnectionResetError, WorkerCrashed) as exc:
                self.answering = False
                await self._kill()
                raise WorkerCrashed(f"no answer to the priority change: {exc!r}") from exc
        if reply.get("id") != request_id or not reply.get("ok"):
            raise PriorityNotRestored(str(reply.get("error") or reply))
        # A restart from here on (a crash while serving) starts at normal priority.
        self._yield_cpu = False
        self.scheduling = "normal"
        log.info("worker_yield_ended", pid=proc.pid, model=self.info.name,
                 threads=reply.get("threads"))

    @property
    def held_s(self) -> float:
        """Time this worker's process has spent stopped by its hold (0 without one)."""
        return 0.0 if self._hold is None else self._hold.held_s

    def watch(self, watcher: RequestWatcher) -> None:
        """Tell `watcher` of each request from now on, and of the one in flight, if any."""
        self._watchers.append(watcher)
        if self.in_flight:
            watcher.request_started()

    def unwatch(self, watcher: RequestWatcher) -> None:
        self._watchers.remove(watcher)

    def _deadline(self, delay_s: float) -> AbstractAsyncContextManager[object]:
        """A deadline that leaves out the time the worker is held, if it has a hold."""
        if self._hold is None:
            return asyncio.timeout(delay_s)
        return self._hold.deadline(delay_s)

    def _end_hold(self) -> None:
        """Continue the process for good (it is promoted, closed or killed): a stopped worker
        would not read its EOF, and nothing may wait for it stopped."""
        if self._hold is not None:
            self._hold.end()
            self._hold = None

    def _set_in_flight(self, in_flight: bool) -> None:
        self.in_flight = in_flight
        for watcher in list(self._watchers):
            if in_flight:
                watcher.request_started()
            else:
                watcher.request_ended()

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[InferenceWorker]:
        """A single worker serves every reading itself (agent/inference/switch.py switches between
        several)."""
        yield self

    async def complete(self, messages: list[dict[str, str]], generation: Generation
                       ) -> Completion:
        """Run one chat completion under the per-request deadline.

        For `generation.prefix_key` (a route's prompt) the worker keeps the model state and
        restores it instead of evaluating the prefix again. Requests waiting together for the
        worker are sent as one batch, with the deadline of one request per request in it.

        A missed deadline kills the worker (WorkerTimeout); a dead worker raises WorkerCrashed;
        either fails every request of the batch. The next call starts a fresh worker after a
        backoff.
        """
        request = {"messages": messages, "max_tokens": generation.max_tokens,
                   "temperature": generation.temperature, "seed": generation.seed,
                   "schema": generation.schema, "prefix_key": generation.prefix_key}
        waiting = _Waiting(request, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        try:
            async with self._lock:
                # Whoever holds the lock sends everything waiting, oldest first; an earlier
                # holder may have sent this request already.
                while not waiting.reply.done():
                    batch = [self._waiting.popleft()
                             for _ in range(min(self.max_batch, len(self._waiting)))]
                    await self._serve(batch)
        finally:
            if waiting in self._waiting:  # cancelled before it was sent
                self._waiting.remove(waiting)
        reply = waiting.reply.result()
        if not reply.get("ok"):
            raise InferenceFailed(str(reply.get("error")))
        return Completion(
            text=str(reply["text"]),
            prompt_tokens=int(reply["prompt_tokens"]),
            completion_tokens=int(reply["completion_tokens"]),
            finish_reason=str(reply["finish_reason"]),
            latency_ms=float(reply["latency_ms"]),
            reused_tokens=int(reply.get("reused_tokens", 0)),
        )

    async def _serve(self, batch: list[_Waiting]) -> None:
        """Send `batch` to the worker and hand each request its reply, or every request the
        failure. Holds the lock."""
        try:
            replies = await self._send([waiting.request for waiting in batch])
        except asyncio.CancelledError:
            # The caller that carried the batch is gone and the worker with it (_send).
            for waiting in batch:
                if not waiting.reply.done():
                    waiting.reply.set_exception(WorkerCrashed(
                        "the worker was stopped with this request in a batch"))
            raise
        except Exception as exc:
            for waiting in batch:
                if not waiting.reply.done():
                    waiting.reply.set_exception(exc)
            return
        for waiting, reply in zip(batch, replies, strict=True):
            if not waiting.reply.done():
                waiting.reply.set_result(reply)

    async def _send(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One exchange with the worker: a request line, or a batch line for several.

        A worker already gone before the request is written (killed from outside, its pipes
        seen closed, not yet reaped) is restarted first: its death is not this request's
        fault, so it must not cost the reading an attempt."""
        if self._proc is None or self._proc.returncode is not None or _pipes_closed(self._proc):
            await self._restart()
        proc = self._proc
        assert proc is not None
        request_id = next(self._ids)
        line = ({**requests[0], "id": request_id} if len(requests) == 1
                else {"id": request_id, "batch": requests})
        timeout_s = self._model.request_timeout_s * len(requests)
        self.liveness.busy()
        self._set_in_flight(True)
        try:
            # The deadline covers the write too: a hung worker stops reading its stdin, and
            # a request larger than the pipe buffer would wait in drain() for ever.
            async with self._deadline(timeout_s):
                reply = await self._exchange(proc, line)
        except TimeoutError as exc:
            self.answering = False
            await self._kill()
            raise WorkerTimeout(
                f"no answer within {timeout_s}s ({len(requests)} requests); worker killed"
            ) from exc
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.answering = False
            await self._kill()
            raise WorkerCrashed(f"worker pipe closed: {exc}") from exc
        except WorkerCrashed:
            self.answering = False
            await self._kill()
            raise
        except asyncio.CancelledError:
            # Its answer would be read as the next request's: the next call starts afresh.
            self._abandon()
            raise
        finally:
            self._set_in_flight(False)
            self.liveness.idle("no request")
        if reply.get("id") != request_id:
            await self._kill()
            raise WorkerCrashed(f"worker answered request {reply.get('id')}, not {request_id}")
        replies: list[dict[str, Any]] = reply["batch"] if len(requests) > 1 else [reply]
        if len(replies) != len(requests):
            await self._kill()
            raise WorkerCrashed(f"worker answered {len(replies)} of {len(requests)} requests")
        if len(requests) > 1:
            self.batched_requests += len(requests)
        self._backoff.reset()
        self.answering = True
        if self.unavailable is not None:
            log.info("model_recovered", path=self.info.path, failures=self.load_failures,
                     after_s=round(time.monotonic() - self._unavailable_since, 1))
            self.unavailable = None
            self.went_unavailable.clear()
        return replies

    async def _exchange(self, proc: asyncio.subprocess.Process, request: dict[str, Any]
                        ) -> dict[str, Any]:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(request).encode() + b"\n")
        await proc.stdin.drain()
        return await self._read(proc)

    async def _read(self, proc: asyncio.subprocess.Process) -> dict[str, Any]:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line:
            code = await _reap(proc)
            raise WorkerCrashed(f"worker exited with {_describe_exit(code)}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def _restart(self) -> None:
        await self._kill()
        delay = self._backoff.next_delay() if self.restarts else 0.0
        self.restarts += 1
        log.warning("worker_restarting", restarts=self.restarts, delay_s=round(delay, 2))
        self.liveness.idle("restart backoff")
        await asyncio.sleep(delay)
        try:
            await self.start()
        except ModelLoadError as exc:
            self._unavailable(exc)
            raise

    def _unavailable(self, exc: ModelLoadError) -> None:
        """The model does not load while serving: reported once, retried at the next request
        (after the backoff) until it answers."""
        self.load_failures += 1
        self.answering = False
        if self.unavailable is None:
            self._unavailable_since = time.monotonic()
            log.error("model_unavailable", path=self.info.path, version=self.info.version,
                      reason=str(exc), retry="at the next reading, after a backoff")
        self.unavailable = str(exc)
        self.went_unavailable.set()

    async def _kill(self) -> None:
        """SIGKILL the worker's whole process group and reap the worker."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._hold is not None:
            self._hold.detach()
        # A SIGSTOPped worker ignores SIGTERM until continued; SIGKILL works regardless.
        _kill_group(proc)
        await _reap(proc)

    def _abandon(self) -> None:
        """Kill the worker's group without waiting (from a cancelled request); the child
        watcher reaps it and the next request starts a new worker."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if self._hold is not None:
                self._hold.detach()
            _kill_group(proc)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Ask the worker to exit (EOF on stdin), then kill it after `timeout_s`; either way
        nothing of its process group is left."""
        self._end_hold()
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None and proc.stdin is not None:
            proc.stdin.close()
            with suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout_s)
        await self._kill()


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL every process of the worker's group (its pid is the group id: start_new_session).
    The kernel keeps a pid in use while a group of that id has members, so this reaches only
    our worker's group, or nothing once that group is empty (ESRCH)."""
    with suppress(ProcessLookupError, PermissionError):  # the group is already empty
        os.killpg(proc.pid, signal.SIGKILL)


def _pipes_closed(proc: asyncio.subprocess.Process) -> bool:
    """The event loop has seen the worker's stdin or stdout close: the worker is gone."""
    return ((proc.stdin is not None and proc.stdin.is_closing())
            or (proc.stdout is not None and proc.stdout.at_eof()))


async def _reap(proc: asyncio.subprocess.Process) -> int | None:
    """The worker's exit status, waited for at most _REAP_TIMEOUT_S. A Process.wait() begun
    before the exit returns only once every process holding the worker's pipes has closed them
    (Python 3.11's base_subprocess), so one that escaped the worker's group (a forked helper
    in a session of its own, say) would hold the agent's request, and its stop, for ever."""
    try:
        code: int | None = await asyncio.wait_for(proc.wait(), _REAP_TIMEOUT_S)
    except TimeoutError:
        code = proc.returncode
        log.error("worker_reap_timeout", pid=proc.pid, exited=code is not None,
                  timeout_s=_REAP_TIMEOUT_S,
                  hint="another process holds the worker's pipes, or it cannot die (D state)")
    if code is not None:
        # Our ends of its pipes, which nothing will use again, even if another process still
        # holds theirs. asyncio has no public close for a Process; this is its transport.
        transport = getattr(proc, "_transport", None)
        if transport is not None:
            transport.close()
    return code


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "its pipe closed, exit not confirmed"
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"

