"""Several chat completions decoded together in one llama.cpp context (issue 16: a backlog).

Runs only inside the inference worker (agent/inference/worker.py), which owns the `Llama`; with the
worker it is the only code importing llama_cpp. Each request gets a sequence of its own in one
unified KV cache and a sampler chain of its own (its grammar included), as llama-server's parallel
slots do; every llama_decode carries one token of each unfinished sequence, so the weights are read
once per step for all of them instead of once per request.

The answer must be the one the request gets from `Llama.create_chat_completion` alone. So nothing
about a request is rebuilt here: the chat handler renders it and hands its arguments to
`create_completion`, which we intercept (`render`); the sampler chain is the library's own
(`Llama._init_sampler`, seeded as `_create_completion` seeds it); and `_Slot.take` is the token
loop of `_create_completion` (end of generation, stop strings, a UTF-8 character split over
tokens, max_tokens), step for step. tests/test_worker_batch.py checks the outputs token for token
against requests answered one at a time.

The shared part of the prompts (a route's system prompt and instruction) lives in sequence 0,
which is also the sequence `Llama` itself uses: it is evaluated once (or found already evaluated,
the prefix cache of agent/inference/worker.py) and shared with each request's sequence by
llama_memory_seq_cp, which in a unified cache only tags the cells. Afterwards sequence 0 holds
exactly that prefix and `Llama` knows it, so the next request, batched or not, reuses it.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Sequence
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
class _Slot:
    """One request in the batch: its sequence and sampler, and `_create_completion`'s state."""

    index: int
    seq: int
    prompt: list[int]
    max_tokens: int
    stop: list[bytes]
    criteria: Any
    sampler: LlamaSampler
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

    def response(self, reused: int, started: float) -> dict[str, Any]:
        return {"ok": True, "text": self.text.decode("utf-8", errors="ignore"),
                "finish_reason": self.finish_reason, "prompt_tokens": len(self.prompt),
                "completion_tokens": len(self.completion),
                "latency_ms": (time.perf_counter() - started) * 1000, "reused_tokens": reused}


def max_tokens_for(llm: Llama, prompt: Sequence[int], max_tokens: int | None) -> int:
    """create_completion's bound on the tokens it generates for `prompt`."""
    n_ctx = llm.n_ctx()
    if len(prompt) >= n_ctx:
        raise ValueError(f"Requested tokens ({len(prompt)}) exceed context window of {n_ctx}")
    if max_tokens is None or max_tokens <= 0:
        max_tokens = n_ctx - len(prompt)
    return max_tokens if max_tokens + len(prompt) < n_ctx else n_ctx - len(prompt)


def cells_needed(prompts: Sequence[Sequence[int]], max_tokens: Sequence[int]) -> int:
    """KV cells a batch of these prompts may fill: the shared prefix once, then each request's
    rest and answer (a UTF-8 character split over tokens may run 3 past max_tokens)."""
    shared = common_prefix(prompts)
    return shared + sum(len(p) - shared + m + 3 for p, m in zip(prompts, max_tokens, strict=True))


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one of its own: its last token's
    logits are what its first sample reads."""
    shortest = min(len(p) for p in prompts)
    count = 0
    while count < shortest - 1 and all(p[count] == prompts[0][count] for p in prompts):
        count += 1
    return count


def decode_together(llm: Llama, args: list[dict[str, Any]],
                    on_prefix: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Answer the rendered requests `args` (each batchable, all fitting the cache together) in
    one set of llama_decode calls, and return their responses in order.

    `on_prefix()` runs once the shared prefix is in sequence 0 and nothing else is in the
    cache (the worker saves its prefix state there). A failed decode raises RuntimeError after
    the other sequences are removed and `llm` is reset; the caller answers the requests alone.
    """
    started = time.perf_counter()
    prompts = [list(a["prompt"]) for a in args]
    shared = common_prefix(prompts)
    # Sequence 0: keep what is already evaluated of the shared prefix, evaluate the rest.
    before = llm.input_ids[: llm.n_tokens].tolist()
    reused = 0
    for a, b in zip(before, prompts[0][:shared], strict=False):
        if a != b:
            break
        reused += 1
    slots: list[_Slot] = []
    try:
        llm.n_tokens = reused
        llm.eval(prompts[0][reused:shared])  # removes seq 0's cells past `reused` first
        if on_prefix is not None:
            on_prefix()
        for index, (a, prompt) in enumerate(zip(args, prompts, strict=True)):
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
            slots.append(_Slot(index=index, seq=index + 1, prompt=prompt,
                               max_tokens=max_tokens_for(llm, prompt, a.get("max_tokens")),
                               stop=[s.encode("utf-8") for s in stop],
                               criteria=a.get("stopping_criteria"), sampler=sampler))
            llm._ctx.kv_cache_seq_cp(0, index + 1, -1, -1)
        _run(llm, slots, shared)
    except Exception:
        for slot in slots:
            llm._ctx.kv_cache_seq_rm(slot.seq, -1, -1)
        llm.reset()  # type: ignore[no-untyped-call]
        raise
    finally:
        for slot in slots:
            slot.sampler.close()  # type: ignore[no-untyped-call]
    for slot in slots:
        llm._ctx.kv_cache_seq_rm(slot.seq, -1, -1)
    # Sequence 0 holds the shared prefix, but the context's logits are not its last token's.
    llm._requires_eval = True
    return [slot.response(reused, started) for slot in slots]


def _run(llm: Llama, slots: list[_Slot], shared: int) -> None:
    """Evaluate each slot's own part of its prompt, then decode one token of every unfinished
    slot per llama_decode until all are done."""
    n_batch = llm.n_batch
    with contextlib.closing(LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1,
                                       verbose=False)) as batch:
        # The prompts' own parts, packed into as few decodes as n_batch allows; a slot's first
        # token is sampled right after the decode that holds its last prompt token (the next
        # decode overwrites the logits).
        pending = [(slot, pos) for slot in slots for pos in range(shared, len(slot.prompt))]
        for start in range(0, len(pending), n_batch):
            chunk = pending[start:start + n_batch]
            last = [(i, slot) for i, (slot, pos) in enumerate(chunk)
                    if pos == len(slot.prompt) - 1]
            _fill(batch, [(slot.prompt[pos], pos, slot.seq, pos == len(slot.prompt) - 1)
                          for slot, pos in chunk])
            llm._ctx.decode(batch)
            for i, slot in last:
                slot.take(llm, slot.sampler.sample(llm._ctx, i))
        while True:
            active = [slot for slot in slots if not slot.done]
            if not active:
                return
            _fill(batch, [(slot.completion[-1], slot.position, slot.seq, True)
                          for slot in active])
            llm._ctx.decode(batch)
            for i, slot in enumerate(active):
                slot.take(llm, slot.sampler.sample(llm._ctx, i))


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
