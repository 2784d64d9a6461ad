"""The inference worker: a child process owning llama.cpp; the daemon's only module importing
llama_cpp (the offline specializer's agent/specialize/llamacpp.py is the other, and reuses
this module's Engine to evaluate models as the worker runs them).

It runs as `python -m agent.inference.worker --model PATH ...` under agent/inference/supervisor.py,
which supervises it. It lives in its own process because a corrupt GGUF can crash the process, a
`Llama` must not be shared between threads, `verbose=False` silences the whole process's stdio
during a load, and memory is reliably returned only when a process exits.

Protocol: one JSON object per line. After loading it writes {"event": "ready", ...} or
{"event": "error", "error": ...}; then for each request line it writes exactly one response line.
A line {"id": ..., "batch": [request, ...]} carries several requests (issue 16: a backlog); its
response {"id": ..., "batch": [response, ...]} answers them in order, each as it would have been
answered alone (agent/inference/batch.py decodes them together, in sequences it keeps from one
batch line to the next; a request line drops them first, so it costs what it did without batching).
A candidate worker (agent/ota/updates.py) is started through `python -m agent.inference.priority`,
which puts it under SCHED_IDLE before this module's imports (a quarter of a CPU-second) run: it
loads and answers its canary at idle priority, and its ready line says `"scheduling": "idle"`.
The line {"id": ..., "control": "normal"} puts all its threads back under SCHED_OTHER before it
takes traffic; the reply says whether that worked ({"ok": true, "threads": N}, or
{"ok": false, "error": ...}).
The protocol uses a private copy of the original stdout; fd 1 is pointed at stderr so anything the
C library prints cannot corrupt the protocol.

When llama.cpp aborts (GGML_ASSERT), ggml's handler would fork and attach gdb to print a backtrace:
a debugger attaching from inside a service, `(gdb)` lines in the agent's JSON log, and a forked
child that can outlive the worker. GGML_NO_BACKTRACE turns that off; the abort message still goes
to stderr and the supervisor sees SIGABRT.

The worker runs in a session of its own (agent/inference/supervisor.py kills its whole process
group), so a signal to the agent's group does not reach it; instead it asks the kernel to SIGKILL
it when the agent dies (PR_SET_PDEATHSIG), so an agent killed uncleanly leaves no worker behind,
not even a hung or stopped one.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, TextIO

from llama_cpp import Llama, LlamaState
from llama_cpp.llama_cpp import llama_n_threads, llama_n_threads_batch
from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

from agent.inference import batch, priority
from agent.inference.grammar import forbid_raw_control_chars


def _protocol_stream() -> TextIO:
    private = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(private, "w", buffering=1, encoding="utf-8")


def _send(stream: TextIO, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message, ensure_ascii=False) + "\n")
    stream.flush()


# Prefix states kept per worker (one per route prompt); a state of a ~1,000-token prefix on the
# bench model is about 16 MB.
PREFIX_STATES = 8


class Engine:
    """A loaded model and the grammars built for it: one request at a time, or up to
    `max_batch` decoded together (agent/inference/batch.py)."""

    def __init__(self, llm: Llama, max_batch: int = 1) -> None:
        self._llm = llm
        self._max_batch = max_batch
        # Sequences kept between batches (the context made by batch.with_sequences).
        self._sequences = batch.Sequences(llm, max_batch) if max_batch > 1 else None
        self._grammars: dict[str, LlamaGrammar] = {}
        # Prefix cache (issue 6): for each request's `prefix_key` (a route's fixed prompt), the
        # model state after its first request. llama-cpp-python already reuses the KV cache for
        # the prefix shared with the previous request; restoring this state extends that to a
        # request whose previous one belonged to another route. The states live in this
        # process, so a new model (a new worker) starts with none.
        self._prefix_states: OrderedDict[str, LlamaState] = OrderedDict()
        self._last_key: str | None = None

    def _grammar(self, schema: dict[str, Any]) -> LlamaGrammar:
        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            # Not LlamaGrammar.from_json_schema: its string rule admits raw control characters,
            # which strict json.loads rejects (see agent/inference/grammar.py).
            gbnf = forbid_raw_control_chars(json_schema_to_gbnf(key))
            grammar = LlamaGrammar.from_string(gbnf, verbose=False)
            self._grammars[key] = grammar
        return grammar

    def _restore_prefix(self, key: str | None) -> None:
        if key is not None and key != self._last_key and key in self._prefix_states:
            self._llm.load_state(self._prefix_states[key])
            self._prefix_states.move_to_end(key)
            self._last_key = key

    def _keep_prefix(self, key: str | None) -> None:
        if key is not None and key not in self._prefix_states:
            self._prefix_states[key] = self._llm.save_state()
            while len(self._prefix_states) > PREFIX_STATES:
                self._prefix_states.popitem(last=False)

    def idle(self) -> None:
        """The worker has had nothing to do for --keep-sequences-s: drop the kept sequences now,
        off any request's time, so the next lone request has the context to itself."""
        if self._sequences is not None:
            self._sequences.clear()

    @property
    def keeping(self) -> bool:
        """Whether sequences kept from a batch are in the context (until `idle`)."""
        return self._sequences is not None and not self._sequences.empty()

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.keeping:
            # A lone request just after a batch belongs to the same backlog (the pipeline's
            # next round finds the worker idle for a moment): it starts from the kept sequences
            # as the batch's requests did, instead of dropping them for the next batch to
            # evaluate again. The same answer either way (tests/test_worker_batch.py).
            args = self._arguments(request)
            if args is not None:
                with contextlib.suppress(RuntimeError):  # no room, or the decode failed
                    return self._together([request.get("prefix_key")], [args])[0]
        schema = request.get("schema")
        started = time.perf_counter()
        key = request.get("prefix_key")
        if self._sequences is not None:
            # Alone, `Llama` has the context to itself: its state saves and loads (the prefix
            # states) cover every sequence, and a lone request must not pay for kept ones.
            self._sequences.clear()
        self._restore_prefix(key)
        before = list(self._llm.input_ids)
        response: Any = self._llm.create_chat_completion(
            messages=request["messages"],
            max_tokens=int(request["max_tokens"]),
            temperature=float(request.get("temperature", 0.0)),
            seed=int(request.get("seed", 0)),
            grammar=self._grammar(schema) if schema else None,
        )
        choice = response["choices"][0]
        usage = response.get("usage") or {}
        self._last_key = key
        self._keep_prefix(key)
        return {
            "ok": True,
            "text": choice["message"].get("content") or "",
            "finish_reason": choice.get("finish_reason") or "",
            "prompt_tokens": int(usage.get("prompt_tokens", 0)),
            "completion_tokens": int(usage.get("completion_tokens", 0)),
            "latency_ms": (time.perf_counter() - started) * 1000,
            "reused_tokens": _common_prefix(before, list(self._llm.input_ids)),
        }


    def complete_many(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answer `requests` in order, each as `complete` would answer it alone.

        Up to `max_batch` at a time are decoded together in the kept sequences
        (batch.Sequences), as many as fit the context; a request the batched decode does not
        reproduce (batch.batchable) and a part whose decode fails are answered one by one.
        Responses of a batched decode carry `batch_size`; those answered alone after a failed
        decode carry `batch_error`.
        """
        responses: list[dict[str, Any] | None] = [None] * len(requests)
        waiting: list[tuple[int, dict[str, Any]]] = []
        for index, request in enumerate(requests):
            args = self._arguments(request) if self._sequences is not None else None
            if args is None:
                responses[index] = self._alone(request)
            else:
                waiting.append((index, args))
        while waiting:
            part = waiting[: self._max_batch]
            try:
                answered = self._together([requests[index].get("prefix_key") for index, _ in part],
                                          [args for _, args in part])
            except RuntimeError as exc:  # llama_decode failed, or no room beside sequence 0
                answered = [self._alone(requests[index], batch_error=str(exc))
                            for index, _ in part]
            # A batched decode answers the first of the part that fit the context.
            for (index, _), response in zip(part, answered, strict=False):
                responses[index] = response
            waiting = waiting[len(answered):]
        return [response for response in responses if response is not None]

    def _together(self, keys: list[str | None], args: list[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
        assert self._sequences is not None
        if self._sequences.empty():
            # Sequence 0 alone in the cache: restoring the route's prefix state wipes nothing.
            self._restore_prefix(keys[0])
        try:
            answered = self._sequences.decode(args)
        except RuntimeError:
            self._last_key = None  # `Llama` was reset
            raise
        # Sequence 0 holds the last answered request's prompt (batch.Sequences.decode).
        self._last_key = keys[len(answered) - 1]
        for response in answered:
            response["batch_size"] = len(answered)
        return answered

    def _alone(self, request: dict[str, Any], batch_error: str | None = None
               ) -> dict[str, Any]:
        try:
            response = self.complete(request)
        except Exception as exc:  # one bad request must not fail the others
            response = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if batch_error is not None:
            response["batch_error"] = batch_error
        return response

    def _arguments(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """What create_chat_completion would generate from, or None to answer it alone."""
        schema = request.get("schema")
        try:
            args = batch.render(self._llm, request["messages"],
                                max_tokens=int(request["max_tokens"]),
                                temperature=float(request.get("temperature", 0.0)),
                                seed=int(request.get("seed", 0)),
                                grammar=self._grammar(schema) if schema else None)
            if not batch.batchable(args):
                return None
            args["max_tokens"] = batch.max_tokens_for(self._llm, args["prompt"],
                                                      args.get("max_tokens"))
        except Exception:  # answered alone, which reports the error as it always has
            return None
        return args


# How long sequences kept from a batch outlive it while no request comes: longer than the
# pipeline's turn between two rounds of a backlog (it commits one round's results and leases
# the next, milliseconds), far shorter than the gap between readings at low load.
KEEP_SEQUENCES_S = 0.25


def _requests(fd: int, engine: Engine, keep_s: float) -> Iterator[bytes]:
    """The request lines on `fd` until it closes; while the engine keeps sequences, `keep_s`
    without a request calls `engine.idle()`. (Read from the file descriptor, not sys.stdin,
    whose buffer may hold a line `select` does not see.)"""
    pending = b""
    while True:
        while b"\n" not in pending:
            if engine.keeping and not select.select([fd], [], [], keep_s)[0]:
                engine.idle()
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            pending += chunk
        line, pending = pending.split(b"\n", 1)
        yield line


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Tokens the request found already evaluated (an upper bound: llama.cpp re-evaluates the
    last one when the whole prompt matched)."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


# <linux/prctl.h>
_PR_SET_PDEATHSIG = 1


def _die_with(parent_pid: int) -> None:
    """SIGKILL this process when the thread that started it exits (prctl(2)); exit at once if
    the agent is already gone (it died between fork and here)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        raise SystemExit(f"the agent (pid {parent_pid}) is gone")


def _control(command: str) -> dict[str, Any]:
    if command != "normal":
        return {"ok": False, "error": f"unknown control {command!r}"}
    try:
        threads = priority.return_to_normal()
    except OSError as exc:
        return {"ok": False, "error": f"returning to SCHED_OTHER failed: {exc}"}
    return {"ok": True, "threads": threads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.inference.worker")
    parser.add_argument("--model", required=True)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-threads", type=int, default=None)
    parser.add_argument("--n-threads-batch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-limit-mb", type=int, default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--max-batch", type=int, default=1,
                        help="requests of one batch line decoded together (1: one at a time)")
    parser.add_argument("--keep-sequences-s", type=float, default=KEEP_SEQUENCES_S,
                        help="idle seconds after which sequences kept from a batch are dropped")
    parser.add_argument("--yield-refused", default=None,
                        help="why agent.inference.priority could not start this worker idle")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        _die_with(args.parent_pid)
    # Read by ggml_print_backtrace() when it aborts (ggml/src/ggml.c): no fork, no gdb.
    os.environ["GGML_NO_BACKTRACE"] = "1"
    out = _protocol_stream()
    started = time.perf_counter()
    if args.memory_limit_mb:
        # RLIMIT_AS bounds the whole address space (mmapped model included): an allocation over
        # it fails inside llama.cpp instead of the kernel's OOM killer choosing a victim.
        limit = args.memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        llm = Llama(
            model_path=args.model,
            n_ctx=args.n_ctx,
            n_threads=args.n_threads,
            n_threads_batch=args.n_threads_batch,
            seed=args.seed,
            verbose=False,
        )
    except Exception as exc:  # llama.cpp reports a bad file as ValueError or RuntimeError
        error = f"{type(exc).__name__}: {exc}"
        if args.memory_limit_mb:
            error += f" (address space limited to {args.memory_limit_mb} MiB)"
        _send(out, {"event": "error", "error": error})
        return 1
    if args.max_batch > 1:
        # Sequence 0 is Llama's own (and the shared prefix); one more per request.
        batch.with_sequences(llm, args.max_batch + 1)
    # The thread counts llama.cpp's context actually got, for the supervisor's log.
    _send(out, {"event": "ready", "load_ms": (time.perf_counter() - started) * 1000,
                "pid": os.getpid(), "threads": llama_n_threads(llm.ctx),
                "threads_batch": llama_n_threads_batch(llm.ctx),
                "scheduling": priority.scheduling(),
                **({"yield_refused": args.yield_refused} if args.yield_refused else {})})
    engine = Engine(llm, args.max_batch)
    for line in _requests(sys.stdin.fileno(), engine, args.keep_sequences_s):
        request = json.loads(line)
        try:
            if "control" in request:
                response = _control(request["control"])
            elif "batch" in request:
                response = {"ok": True, "batch": engine.complete_many(request["batch"])}
            else:
                response = engine.complete(request)
        except Exception as exc:  # one bad request must not take the worker down
            response = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        response["id"] = request.get("id")
        _send(out, response)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
