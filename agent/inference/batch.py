"""Several chat completions decoded together in one llama.cpp context (issue 16: a backlog).

Runs only inside the inference worker (agent/inference/worker.py), which owns the `Llama`; with the
worker it is the only code importing llama_cpp. Each request gets a sequence of its own in one
unified KV cache and a sampler chain of its own (its grammar included), as llama-server's parallel
slots do; every llama_decode carries one token of each unfinished sequence, so the weights are read
once per step for all of them instead of once per request.

The answer must be the one the request gets from `Llama.create_chat_completion` alone. So nothing
about a request is rebuilt here: the chat handler renders it and hands its arguments to
`create_completion`, which we intercept (`render`); the sampler chain is the library's own
(`Llama._init_sampler`, seeded as `_create_completion` seeds it); and `_Request.take` is the token
loop of `_create_completion` (end of generation, stop strings, a UTF-8 character split over
tokens, max_tokens), step for step. tests/test_worker_batch.py checks the outputs token for token
against requests answered one at a time.

What pays is the prompt evaluated, not the steps shared: one at a time, `Llama` evaluates only
what a prompt does not share with the previous one, and a batch must do at least as well. So the
sequences are kept between batches, each with the prompt it last answered (`Sequences`, as
llama-server keeps its slots with cache_prompt), and a request starts from the longest part of
its prompt that any sequence holds, shared by llama_memory_seq_cp (which in a unified cache
only tags the cells). Readings of one topic differ only from their payload on: in a backlog
each evaluates little more than its payload. Sequence 0 is `Llama`'s own (its prompt cache,
and the prefix states of agent/inference/worker.py); a batch reads it and leaves its last
prompt there, as if that request had been answered alone.

Every sequence's token attends over all cells in use (llama.cpp's unified cache masks the
others' cells but computes them), so kept sequences make each decoded token dearer; what they
save in evaluated prompt outweighs that on the bench (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from llama_cpp import Llama, llama_cpp
from llama_cpp._internals import LlamaBatch, LlamaContext, LlamaSampler

# Arguments of create_completion this module does not reproduce: a request that sets one of
# them is answered alone, by the library itself.
_UNSUPPORTED = {"logits_processor": None, "logit_bias": None, "mirostat_mode": 0,
                "stream": False, "logprobs": None, "suffix": None}


def with_sequences(llm: Llama, n_seq: int) -> None:
    """Recreate `llm`'s context with room for `n_seq` sequences in one unified KV cache of the
    same n_ctx. `Llama` takes no n_seq_max (it sets one only for embeddings), so the context it
    made is replaced before any token is evaluated."""
    params = llm.context_params
    params.n_seq_max = n_seq
    # One cache shared by every sequence: a request alone still has all of n_ctx, as before.
    params.kv_unified = True
    ctx = LlamaContext(model=llm._model, params=params, verbose=False)
    old, llm._ctx = llm._ctx, llm._stack.enter_context(contextlib.closing(ctx))
    old.close()  # type: ignore[no-untyped-call]


class _Captured(Exception):
    """Carries create_completion's arguments out of the chat handler (control flow)."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__("create_completion intercepted")
        self.kwargs = kwargs


class _Interceptor:
    """Stands in for the `Llama` passed to a chat handler: everything is the real model's, but
    create_completion hands back its arguments instead of generating."""

    def __init__(self, llm: Llama) -> None:
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, **kwargs: Any) -> Any:
        raise _Captured(kwargs)


def render(llm: Llama, messages: list[dict[str, str]], **kwargs: Any) -> dict[str, Any]:
    """The arguments `llm.create_chat_completion(messages, **kwargs)` passes to
    create_completion: the prompt's tokens, stop strings and criteria, sampling parameters.
    create_chat_completion itself runs, on the interceptor, so its defaults (repeat_penalty=1.0,
    where the chat handler's own is 1.1) and its choice of handler are the ones used."""
    try:
        Llama.create_chat_completion(_Interceptor(llm), messages=messages,  # type: ignore[arg-type]
                                     **kwargs)
    except _Captured as captured:
        return captured.kwargs
    raise RuntimeError("the chat handler did not call create_completion")


def batchable(args: dict[str, Any]) -> bool:
    """Whether `args` (from `render`) can be decoded here: a token prompt and nothing of
    _UNSUPPORTED."""
    return isinstance(args.get("prompt"), list) and all(
        args.get(key, default) == default for key, default in _UNSUPPORTED.items())


@dataclass
class _Request:
    """One request in the batch: its sequence and sampler, how much of its prompt is evaluated
    (-1 while it waits for its leader), and `_create_completion`'s state."""

    seq: int
    prompt: list[int]
    max_tokens: int
    stop: list[bytes]
    criteria: Any
    sampler: LlamaSampler
    reused: int
    leader: int | None
    cells: list[int]
    evaluated: int
    completion: list[int] = field(default_factory=list)
    text: bytes = b""
    finish_reason: str = "length"
    done: bool = False
    multibyte_fix: int = 0

    def take(self, llm: Llama, token: int) -> None:
        """The body of `_create_completion`'s loop for one sampled token (non-streaming), and
        the stopping criteria `generate` checks before yielding it."""
        if self.criteria is not None and self.criteria(
                np.asarray(self.prompt + self.completion, dtype=np.intc),
                np.zeros(0, dtype=np.single)):
            self.text = llm.detokenize(self.completion, prev_tokens=self.prompt)
            self.finish_reason, self.done = "stop", True
            return
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            self.text = llm.detokenize(self.completion, prev_tokens=self.prompt)
            self.finish_reason, self.done = "stop", True
            return
        self.completion.append(token)
        all_text = llm.detokenize(self.completion, prev_tokens=self.prompt)
        # A character split over tokens: wait for its last byte (same rule as the library).
        for k, char in enumerate(all_text[-3:]):
            k = 3 - k
            for num, pattern in ((2, 192), (3, 224), (4, 240)):
                if num > k and pattern & char == pattern:
                    self.multibyte_fix = num - k
        if self.multibyte_fix > 0:
            self.multibyte_fix -= 1
            return
        any_stop = [s for s in self.stop if s in all_text]
        if any_stop:
            self.text = all_text[: all_text.index(any_stop[0])]
            self.finish_reason, self.done = "stop", True
            return
        if len(self.completion) >= self.max_tokens:
            self.text = llm.detokenize(self.completion, prev_tokens=self.prompt)
            self.finish_reason, self.done = "length", True

    @property
    def position(self) -> int:
        """Where the last sampled token goes in the sequence."""
        return len(self.prompt) + len(self.completion) - 1

    def response(self, started: float) -> dict[str, Any]:
        return {"ok": True, "text": self.text.decode("utf-8", errors="ignore"),
                "finish_reason": self.finish_reason, "prompt_tokens": len(self.prompt),
                "completion_tokens": len(self.completion),
                "latency_ms": (time.perf_counter() - started) * 1000, "reused_tokens": self.reused}


def max_tokens_for(llm: Llama, prompt: Sequence[int], max_tokens: int | None) -> int:
    """create_completion's bound on the tokens it generates for `prompt`."""
    n_ctx = llm.n_ctx()
    if len(prompt) >= n_ctx:
        raise ValueError(f"Requested tokens ({len(prompt)}) exceed context window of {n_ctx}")
    if max_tokens is None or max_tokens <= 0:
        max_tokens = n_ctx - len(prompt)
    return max_tokens if max_tokens + len(prompt) < n_ctx else n_ctx - len(prompt)


def _shared(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Tokens `a` and `b` both start with, at most `limit`."""
    count = 0
    for x, y in zip(a[:limit], b[:limit], strict=False):
        if x != y:
            break
        count += 1
    return count


@dataclass
class _Held:
    """What a sequence holds: a prompt's first tokens, and an id per position for the KV cell
    behind it (sequences that share cells, by llama_memory_seq_cp, share ids)."""

    tokens: list[int] = field(default_factory=list)
    cells: list[int] = field(default_factory=list)
    used: int = 0  # when it last served a request (Sequences' clock)


@dataclass(frozen=True)
class _Start:
    """Where a request's sequence starts from: `reused` cells of `source` (its own sequence's
    kept prompt, sequence 0, or another kept sequence), or, when `leader` is set, the first
    `reused` cells of that earlier request of the batch once its prompt is evaluated."""

    seq: int
    source: int
    reused: int
    leader: int | None


class Sequences:
    """Sequences 1..count of a context made by `with_sequences`, kept between batches as
    llama-server keeps its slots (cache_prompt): each holds the prompt it last answered.

    A request starts from the longest part of its prompt any sequence holds: in place when
    only its own sequence holds it (the one free sequence that holds that much), else copied
    into an empty or the least recently used sequence, so the other prompts stay; or, longer
    still, from an earlier request of the same batch once that one's prompt is evaluated. It
    evaluates only the rest. Readings of one topic differ only from their payload on, so in a
    backlog each reading evaluates its payload instead of everything after the route's prompt.
    Kept sequences that are not needed are evicted, least recently used first, when the batch
    needs their cells.

    Sequence 0 is `Llama`'s own, and a source like the others; after a batch it holds the
    batch's last prompt, as after that request answered alone. `Llama`'s state saves and loads
    (the worker's prefix states, agent/inference/worker.py) cover every sequence, so the worker
    drops the kept ones (`clear`) once it has been idle for a moment (--keep-sequences-s) or
    before it answers a request alone; a lone request just after a batch is decoded from them
    instead (the next round of the same backlog).
    """

    def __init__(self, llm: Llama, count: int) -> None:
        self._llm = llm
        self._held = {seq: _Held() for seq in range(1, count + 1)}
        self._zero = _Held()
        self._ids = itertools.count()
        self._clock = 0

    def empty(self) -> bool:
        return not any(held.tokens for held in self._held.values())

    def clear(self) -> None:
        """Remove every kept sequence's cells, and move sequence 0's to the start of the cache.

        llama.cpp attends over every cell up to the last one in use (n_kv), masked or not, so
        a lone request after a batch would read about the whole cache for every token unless
        its cells are packed at the start again; a copy out and back of sequence 0's state
        packs them (the values are copied, not recomputed: answers do not change)."""
        if self.empty():
            return
        self._drop()
        ctx = self._llm._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        data = (ctypes.c_uint8 * size)()
        copied = llama_cpp.llama_state_seq_get_data(ctx, data, size, 0)
        self._llm._ctx.kv_cache_clear()  # type: ignore[no-untyped-call]
        if copied != size or llama_cpp.llama_state_seq_set_data(ctx, data, size, 0) != size:
            self._llm.reset()  # type: ignore[no-untyped-call]  # evaluated again, from the start

    def _drop(self) -> None:
        for seq in self._held:
            self._llm._ctx.kv_cache_seq_rm(seq, -1, -1)
            self._held[seq] = _Held()

    def decode(self, args: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answer the first requests of `args` (rendered, each batchable, at most one per
        sequence) that fit the cache together, at least one, in one set of llama_decode calls;
        return their responses in order.

        RuntimeError when even the first does not fit, or after a failed decode (the kept
        sequences dropped and `llm` reset); the caller answers those requests alone.
        """
        started = time.perf_counter()
        llm = self._llm
        zero = llm.input_ids[: llm.n_tokens].tolist()
        if zero != self._zero.tokens:  # Llama answered alone meanwhile (the kept ones are gone)
            self._zero = _Held(zero, [next(self._ids) for _ in zero])
        prompts = [list(a["prompt"]) for a in args]
        count, evicted = len(args), set[int]()
        while True:
            starts, cells = self._plan(prompts[:count], evicted)
            if cells + sum(a["max_tokens"] + 3 for a in args[:count]) <= llm.n_ctx():
                break
            claimed = {start.seq for start in starts}
            idle = sorted((held.used, seq) for seq, held in self._held.items()
                          if held.tokens and seq not in claimed and seq not in evicted)
            if idle:
                evicted.add(idle[0][1])
            elif count > 1:
                count, evicted = count - 1, set()
            else:
                raise RuntimeError("the request does not fit the cache beside sequence 0")
        requests: list[_Request] = []
        try:
            for seq in evicted:
                llm._ctx.kv_cache_seq_rm(seq, -1, -1)
                self._held[seq] = _Held()
            for a, prompt, start in zip(args, prompts, starts, strict=False):
                requests.append(self._request(a, prompt, start))
            self._run(requests)
        except Exception:
            for request in requests:
                request.sampler.close()  # type: ignore[no-untyped-call]
            self._drop()
            llm.reset()  # type: ignore[no-untyped-call]
            raise
        self._clock += 1
        for request in requests:
            request.sampler.close()  # type: ignore[no-untyped-call]
            # Keep the prompt for the next batch; the answer's cells go.
            llm._ctx.kv_cache_seq_rm(request.seq, len(request.prompt), -1)
            self._held[request.seq] = _Held(request.prompt, request.cells, self._clock)
        # Sequence 0 takes the last prompt (its cells shared), so a request answered alone after
        # the backlog finds it evaluated, as after a request answered alone. The context's
        # logits are not its last token's: `Llama` evaluates that token again.
        last = requests[-1]
        llm._ctx.kv_cache_seq_rm(0, -1, -1)
        llm._ctx.kv_cache_seq_cp(last.seq, 0, 0, len(last.prompt))
        llm.input_ids[: len(last.prompt)] = last.prompt
        llm.n_tokens = len(last.prompt)
        llm._requires_eval = True
        self._zero = _Held(last.prompt, last.cells)
        return [request.response(started) for request in requests]

    def _plan(self, prompts: list[list[int]], evicted: set[int]
              ) -> tuple[list[_Start], int]:
        """Where each prompt starts from, and the cells in use once the sequences are set up
        plus those the prompts' rest will take."""
        held = {seq: _Held() if seq in evicted else h for seq, h in self._held.items()}
        held[0] = self._zero
        starts: list[_Start] = []
        fresh = 0
        for prompt in prompts:
            # Its last token is always evaluated: its logits are what the first sample reads.
            limit = len(prompt) - 1
            shares = {seq: _shared(prompt, h.tokens, limit) for seq, h in held.items()}
            best = max(shares.values())
            free = [seq for seq in self._held if seq not in {s.seq for s in starts}]
            holding = [seq for seq in self._held if shares[seq] == best]
            if best > 0 and len(holding) == 1 and holding[0] in free:
                seq = holding[0]  # the one kept sequence holding that much: reuse it in place
            else:
                # What it starts from is elsewhere too (copied, sharing the cells): take an
                # empty sequence, else the least recently used, and keep the others' prompts.
                seq = min(free, key=lambda s: (bool(held[s].tokens), held[s].used))
            source, reused = seq, shares[seq]
            for other, shared in shares.items():
                if shared > reused:
                    source, reused = other, shared
            leader = None
            for index, start in enumerate(starts):
                shared = _shared(prompt, prompts[index], limit)
                if start.leader is None and shared > reused:
                    leader, reused = index, shared
            if leader is None:
                held[seq] = _Held(prompt[:reused], held[source].cells[:reused])
            else:
                held[seq] = _Held()
            starts.append(_Start(seq, source, reused, leader))
            fresh += len(prompt) - reused
        in_use = set().union(*(h.cells for h in held.values()))
        return starts, len(in_use) + fresh

    def _request(self, a: dict[str, Any], prompt: list[int], start: _Start) -> _Request:
        """Set up the request's sequence (unless it waits for a leader) and its sampler."""
        llm = self._llm
        if start.leader is None:
            source = self._zero if start.source == 0 else self._held[start.source]
            cells = source.cells[: start.reused]
            if start.source == start.seq:
                llm._ctx.kv_cache_seq_rm(start.seq, start.reused, -1)
            else:
                llm._ctx.kv_cache_seq_rm(start.seq, -1, -1)
                llm._ctx.kv_cache_seq_cp(start.source, start.seq, 0, start.reused)
            self._held[start.seq] = _Held(prompt[: start.reused], cells)
        else:
            # Filled from the leader's sequence once evaluated (_run); until then it holds
            # nothing another request could start from.
            llm._ctx.kv_cache_seq_rm(start.seq, -1, -1)
            self._held[start.seq] = _Held()
            cells = []
        # As _create_completion seeds it: the request's seed, else one drawn from the last.
        seed = a.get("seed")
        llm.set_seed(int(seed) if seed is not None
                     else random.Random(llm._seed).randint(0, 2**32))
        sampler = llm._init_sampler(
            top_k=a.get("top_k", 40), top_p=a.get("top_p", 0.95),
            min_p=a.get("min_p", 0.05), typical_p=a.get("typical_p", 1.0),
            temp=a.get("temperature", 0.8), repeat_penalty=a.get("repeat_penalty", 1.0),
            frequency_penalty=a.get("frequency_penalty", 0.0),
            presence_penalty=a.get("presence_penalty", 0.0), tfs_z=a.get("tfs_z", 1.0),
            grammar=a.get("grammar"))
        stop = a.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        return _Request(seq=start.seq, prompt=prompt, max_tokens=int(a["max_tokens"]),
                        stop=[s.encode("utf-8") for s in stop],
                        criteria=a.get("stopping_criteria"), sampler=sampler,
                        reused=start.reused, leader=start.leader, cells=list(cells),
                        evaluated=start.reused if start.leader is None else -1)

    def _run(self, requests: list[_Request]) -> None:
        """Per llama_decode: the last sampled token of every request generating, then as much
        of the prompts' rest as n_batch allows; a request's first token is sampled right after
        the decode that holds its last prompt token (the next decode overwrites the logits)."""
        llm = self._llm
        n_batch = llm.n_batch
        with contextlib.closing(LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1,
                                           verbose=False)) as batch:
            while True:
                for request in requests:
                    if request.leader is not None and request.evaluated < 0:
                        leader = requests[request.leader]
                        if leader.evaluated == len(leader.prompt):
                            llm._ctx.kv_cache_seq_cp(leader.seq, request.seq, 0, request.reused)
                            request.cells = leader.cells[: request.reused]
                            request.evaluated = request.reused
                entries: list[tuple[int, int, int, bool]] = []
                sampled: list[tuple[int, _Request]] = []
                for request in requests:
                    if not request.done and request.evaluated == len(request.prompt):
                        sampled.append((len(entries), request))
                        entries.append((request.completion[-1], request.position, request.seq,
                                        True))
                for request in requests:
                    first = max(request.evaluated, 0)
                    take = min(len(request.prompt) - first, n_batch - len(entries))
                    if request.evaluated < 0 or take <= 0:
                        continue
                    for pos in range(first, first + take):
                        last = pos == len(request.prompt) - 1
                        if last:
                            sampled.append((len(entries), request))
                        entries.append((request.prompt[pos], pos, request.seq, last))
                    request.cells += [next(self._ids) for _ in range(take)]
                    request.evaluated += take
                if not entries:
                    return
                _fill(batch, entries)
                llm._ctx.decode(batch)
                for index, request in sampled:
                    request.take(llm, request.sampler.sample(llm._ctx, index))


def _fill(batch: LlamaBatch, tokens: list[tuple[int, int, int, bool]]) -> None:
    """(token, position, sequence, wants logits) for each entry of the batch."""
    raw = batch.batch
    raw.n_tokens = len(tokens)
    for i, (token, pos, seq, logits) in enumerate(tokens):
        raw.token[i] = token
        raw.pos[i] = pos
        raw.seq_id[i][0] = seq
        raw.n_seq_id[i] = 1
        raw.logits[i] = logits
