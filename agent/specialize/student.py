"""The student: a small llama-architecture transformer in PyTorch, trained from scratch on the
exact token sequences the agent feeds llama.cpp, then handed over as float32 numpy tensors named
as llama.cpp's llama graph names them. The only module importing torch.

The forward pass is llama.cpp's llama (LLM_ARCH_LLAMA): RMS norm, rotary position embedding in
the "normal" mode llama.cpp uses for this architecture (adjacent pairs rotated; Hugging Face's
checkpoints rotate halves, hence the permutation in llama.cpp's converter, which a model trained
here does not need), causal multi-head attention, a SwiGLU feed-forward, untied output.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from agent.specialize.recipe import RMS_EPS, ROPE_FREQ_BASE, Recipe

IGNORE = -100  # cross_entropy's ignore_index: prompt and padding positions carry no loss


@dataclass(frozen=True, slots=True)
class Tokens:
    """One training sequence: prompt ids, then answer ids ending in EOS."""

    ids: list[int]
    n_prompt: int


@dataclass(frozen=True, slots=True)
class Progress:
    step: int
    steps: int
    loss: float
    elapsed_s: float
    cpu_s: float  # this process's CPU time: on a shared machine, the figure that compares


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * weight


class _Block(nn.Module):
    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        e, ff = recipe.n_embd, recipe.n_ff
        self.n_head, self.head_dim = recipe.n_head, recipe.head_dim
        self.attn_norm = nn.Parameter(torch.ones(e))
        self.q, self.k, self.v, self.o = (nn.Linear(e, e, bias=False) for _ in range(4))
        self.ffn_norm = nn.Parameter(torch.ones(e))
        self.gate = nn.Linear(e, ff, bias=False)
        self.up = nn.Linear(e, ff, bias=False)
        self.down = nn.Linear(ff, e, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The block over x (batch, length, n_embd), causal."""
        h = _rms_norm(x, self.attn_norm)
        q, k, v = self._qkv(h, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self._rest(x, att)

    def shared(self, prefix: torch.Tensor, suffix: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, at: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block over a batch whose rows share their first P positions: `prefix` (1, P,
        n_embd) once, `suffix` (batch, S, n_embd) per row, attending to the shared keys. Given
        absolute positions `at` (batch, n) it runs only there (the last block in training:
        only answer positions carry loss) and returns (prefix, those positions' states)."""
        n_prefix, (batch, n_suffix, _) = prefix.shape[1], suffix.shape
        hp, hs = _rms_norm(prefix, self.attn_norm), _rms_norm(suffix, self.attn_norm)
        qp, kp, vp = self._qkv(hp, cos[:n_prefix], sin[:n_prefix])
        ks, vs = self._kv(hs, cos, sin, n_prefix)
        keys = torch.cat((kp.expand(batch, -1, -1, -1), ks), 2)
        values = torch.cat((vp.expand(batch, -1, -1, -1), vs), 2)
        seen = torch.arange(n_prefix + n_suffix)
        if at is None:
            prefix = self._rest(prefix, F.scaled_dot_product_attention(qp, kp, vp,
                                                                       is_causal=True))
            q = self._q(hs, cos[n_prefix:n_prefix + n_suffix], sin[n_prefix:n_prefix + n_suffix])
            mask = seen[None, :] <= torch.arange(n_prefix, n_prefix + n_suffix)[:, None]
            return prefix, self._rest(suffix, F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask))
        rows = torch.arange(batch)[:, None]
        hs, xs = hs[rows, at - n_prefix], suffix[rows, at - n_prefix]  # (batch, n, n_embd)
        q = self._q(hs, cos.squeeze(1)[at][:, :, None], sin.squeeze(1)[at][:, :, None])
        mask = seen[None, None, :] <= at[:, :, None]  # (batch, n, P + S)
        return prefix, self._rest(xs, F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask[:, None]))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """(batch, length, n_embd) -> (batch, n_head, length, head_dim)."""
        return t.view(t.shape[0], t.shape[1], self.n_head, self.head_dim).transpose(1, 2)

    def _q(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self._split(_rope_flat(self.q(h), cos, sin, self.n_head))

    def _qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, v = self._kv(h, cos, sin, 0)
        return self._q(h, cos, sin), k, v

    def _kv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + h.shape[1]
        k = _rope_flat(self.k(h), cos[start:end], sin[start:end], self.n_head)
        return self._split(k), self._split(self.v(h))

    def _rest(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """Attention output projected and added, then the feed-forward."""
        x = x + self.o(att.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        h = _rms_norm(x, self.ffn_norm)
        out: torch.Tensor = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return out


def _rope_flat(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               n_head: int) -> torch.Tensor:
    """_rope on (batch, length, n_embd), split into heads and back."""
    shape = x.shape
    return _rope(x.view(*shape[:2], n_head, -1), cos, sin).view(shape)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x0, x1), (x2, x3), ... of each head: llama.cpp's LLAMA_ROPE_TYPE_NORM."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class Student(nn.Module):
    def __init__(self, recipe: Recipe, n_vocab: int) -> None:
        super().__init__()
        self.recipe = recipe
        self.embed = nn.Embedding(n_vocab, recipe.n_embd)
        self.blocks = nn.ModuleList(_Block(recipe) for _ in range(recipe.n_layer))
        self.norm = nn.Parameter(torch.ones(recipe.n_embd))
        self.output = nn.Linear(recipe.n_embd, n_vocab, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        half = recipe.head_dim // 2
        freqs = ROPE_FREQ_BASE ** (-torch.arange(half, dtype=torch.float64) * 2 / recipe.head_dim)
        angles = torch.arange(recipe.n_ctx, dtype=torch.float64)[:, None] * freqs[None, :]
        # (n_ctx, 1, half): broadcast over heads.
        self.cos_table: torch.Tensor
        self.sin_table: torch.Tensor
        self.register_buffer("cos_table", angles.cos().float()[:, None, :], persistent=False)
        self.register_buffer("sin_table", angles.sin().float()[:, None, :], persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, length, n_vocab) at every position of ids (batch, length)."""
        length = ids.shape[1]
        cos, sin = self.cos_table[:length], self.sin_table[:length]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits: torch.Tensor = self.output(_rms_norm(x, self.norm))
        return logits

    def forward_train(self, ids: torch.Tensor, n_shared: int, at: torch.Tensor) -> torch.Tensor:
        """Logits (batch, n, n_vocab) at the positions `at` (batch, n) of ids, whose rows all
        begin with the same `n_shared` tokens: those are computed once, not once per row (the
        route's fixed prompt is a third of a sequence), and the last block and the output
        layer run at the answer positions only (the rest carry no loss). The same numbers as
        forward() at those positions."""
        if not 0 < n_shared <= int(at.min()):
            raise ValueError(f"shared prefix {n_shared} must be within the prompt")
        length = ids.shape[1]
        cos, sin = self.cos_table[:length], self.sin_table[:length]
        prefix, suffix = self.embed(ids[:1, :n_shared]), self.embed(ids[:, n_shared:])
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            assert isinstance(block, _Block)
            prefix, suffix = block.shared(prefix, suffix, cos, sin,
                                          at if index == last else None)
        logits: torch.Tensor = self.output(_rms_norm(suffix, self.norm))
        return logits

    def tensors(self) -> list[tuple[str, npt.NDArray[np.float32]]]:
        """The weights under llama.cpp's tensor names, as float32 numpy arrays."""
        def arr(t: torch.Tensor) -> npt.NDArray[np.float32]:
            return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))

        out = [("token_embd.weight", arr(self.embed.weight))]
        for i, block in enumerate(self.blocks):
            assert isinstance(block, _Block)
            p = f"blk.{i}."
            out += [(p + "attn_norm.weight", arr(block.attn_norm)),
                    (p + "attn_q.weight", arr(block.q.weight)),
                    (p + "attn_k.weight", arr(block.k.weight)),
                    (p + "attn_v.weight", arr(block.v.weight)),
                    (p + "attn_output.weight", arr(block.o.weight)),
                    (p + "ffn_norm.weight", arr(block.ffn_norm)),
                    (p + "ffn_gate.weight", arr(block.gate.weight)),
                    (p + "ffn_up.weight", arr(block.up.weight)),
                    (p + "ffn_down.weight", arr(block.down.weight))]
        out += [("output_norm.weight", arr(self.norm)), ("output.weight", arr(self.output.weight))]
        return out


def _batch(items: Sequence[Tokens]) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Right-padded inputs; how many leading tokens every row shares (at least 1, at most up
    to the shortest prompt's last token); for each row the positions that predict an answer
    token (position t predicts token t + 1: from n_prompt - 1 on), padded by repeating the
    last; and their targets, IGNORE where padded."""
    length = max(len(s.ids) for s in items) - 1
    answers = max(len(s.ids) - s.n_prompt for s in items)
    inputs = torch.zeros((len(items), length), dtype=torch.long)
    at = torch.zeros((len(items), answers), dtype=torch.long)
    targets = torch.full((len(items), answers), IGNORE, dtype=torch.long)
    for row, seq in enumerate(items):
        ids = torch.tensor(seq.ids, dtype=torch.long)
        n = len(ids) - seq.n_prompt
        inputs[row, :len(ids) - 1] = ids[:-1]
        at[row] = torch.arange(seq.n_prompt - 1, seq.n_prompt - 1 + answers).clamp(
            max=len(ids) - 2)
        targets[row, :n] = ids[seq.n_prompt:]
    shared = min(s.n_prompt for s in items) - 1
    differ = (inputs[:, :shared] != inputs[:1, :shared]).any(0).nonzero()
    if len(differ):
        shared = int(differ[0])
    return inputs, max(1, shared), at, targets


def warmup_cosine(warmup_steps: int, steps: int) -> Callable[[int], float]:
    """The learning-rate factor of a step: linear warm-up, then cosine decay to 5%."""
    def rate(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done))
    return rate


def batches(data: Sequence[Tokens], batch: int, steps: int, generator: torch.Generator
            ) -> Iterator[list[Tokens]]:
    """`steps` batches of `batch` sequences drawn without replacement, reshuffled each pass."""
    order = torch.randperm(len(data), generator=generator).tolist()
    cursor = 0
    for _ in range(steps):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(data), generator=generator).tolist(), 0
        yield [data[i] for i in order[cursor:cursor + batch]]
        cursor += batch


def train(recipe: Recipe, n_vocab: int, data: Sequence[Tokens],
          progress: Callable[[Progress], None], *, progress_every: int = 25) -> Student:
    """Train a new student on `data` for recipe.steps steps of recipe.batch sequences drawn
    without replacement (reshuffled each pass), AdamW with warm-up then cosine decay."""
    if not data:
        raise ValueError("no training sequences")
    if max(len(s.ids) for s in data) > recipe.n_ctx:
        raise ValueError(f"a training sequence is longer than n_ctx ({recipe.n_ctx})")
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    model = Student(recipe, n_vocab)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay},
         {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98), fused=True)

    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(recipe.warmup_steps, recipe.steps))
    started, cpu, running = time.monotonic(), time.process_time(), 0.0
    model.train()
    for step, picked in enumerate(batches(data, recipe.batch, recipe.steps, generator)):
        inputs, shared, at, targets = _batch(picked)
        logits = model.forward_train(inputs, shared, at)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.view(-1),
                               ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = loss.item() if step == 0 else 0.9 * running + 0.1 * loss.item()
        if (step + 1) % progress_every == 0 or step + 1 == recipe.steps:
            progress(Progress(step + 1, recipe.steps, running, time.monotonic() - started,
                              time.process_time() - cpu))
    model.eval()
    return model


def greedy(model: Student, prompt: list[int], *, eos_id: int, max_new: int) -> list[int]:
    """The argmax continuation of `prompt` up to EOS (excluded) or `max_new` tokens."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids], dtype=torch.long))[0, -1]
            token = int(logits.argmax())
            if token == eos_id:
                break
            out.append(token)
            ids.append(token)
    return out


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
