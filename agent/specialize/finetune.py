"""Fine-tuning a pretrained llama GGUF (e.g. SmolLM2-135M-Instruct) for a route with LoRA: the
other way to build the student (`edge-agent model specialize --from-base GGUF`).

The base's tensors are dequantized to float32 (agent/specialize/pretrained.py) and run by the
llama forward pass student.py runs (RMS norm, llama.cpp's "normal" rotary mode on the GGUF's
Q/K rows as stored), here with grouped-query attention (a key/value head serves
n_head / n_head_kv query heads, as ggml broadcasts it), the base's rope frequency and norm
epsilon, and an output layer tied to the token embedding when the file has no output.weight.
Low-rank adapters (LoRA: W + alpha/r * B A, B starting at zero) on the attention and
feed-forward projections of the top blocks are the only trained weights; the loss is on the
answer tokens only; the route's fixed prompt (the batch's common prefix) is computed once per
batch. The adapters are then merged and the model written with the base's metadata
(tokenizer, chat template), quantized by llama.cpp and evaluated like the from-scratch student.

Training sequences are tokenized by llama.cpp from the base GGUF itself, through its own chat
template (agent/specialize/llamacpp.Tokenizer). Imports torch (as student.py does).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from agent.config.settings import Route
from agent.specialize import examples, llamacpp, pretrained
from agent.specialize.evaluate import Scores, evaluate, table
from agent.specialize.pretrained import Shape
from agent.specialize.recipe import Recipe
from agent.specialize.run import Request, find_route, labelled, printer, write_report
from agent.specialize.student import (
    IGNORE,
    Progress,
    Tokens,
    _batch,
    _rope,
    batches,
    warmup_cosine,
)

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
          "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
Past = tuple[torch.Tensor, torch.Tensor]  # one block's keys and values (batch, n_head_kv, T, d)


@dataclass(frozen=True, slots=True)
class Plan:
    """How the base is fine-tuned. Recorded next to the model (recipe.json)."""

    # The measured run of docs/specialize.md (0.797 on the temperature route's 300 held-out
    # readings at q8_0; 90 steps stayed at the base's 0.327).
    steps: int = 200
    batch: int = 4
    lr: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    rank: int = 8
    alpha: float = 16.0
    # Adapters on the top `layers` blocks (0: every block); the blocks below run forward only.
    layers: int = 12
    # The training pass's matrix products in bfloat16 (torch.autocast; the adapters, the loss
    # and everything after training stay float32): about twice the speed on a CPU with
    # AVX512-BF16.
    bf16: bool = True
    targets: tuple[str, ...] = TARGETS
    train_examples: int = 6000
    eval_examples: int = 300
    torch_check: int = 30  # held-out readings the torch model answers too, for "= torch"
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch", "rank", "train_examples", "eval_examples"):
            if getattr(self, key) <= 0:
                raise ValueError(f"fine-tune: {key} must be positive, got {getattr(self, key)}")
        unknown = set(self.targets) - set(TARGETS)
        if unknown or not self.targets:
            raise ValueError(f"fine-tune: targets {sorted(unknown) or '()'}: choose among "
                             f"{', '.join(TARGETS)}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class Adapted(nn.Module):
    """A frozen weight (out, in) plus, with rank > 0, a trained low-rank update."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        self.weight: torch.Tensor
        self.register_buffer("weight", weight)
        self.rank, self.scale = rank, alpha / max(rank, 1)
        if rank:
            n_out, n_in = weight.shape
            bound = 1 / math.sqrt(n_in)  # nn.Linear's initialisation, as LoRA's A
            self.a = nn.Parameter(torch.empty(rank, n_in).uniform_(-bound, bound))
            self.b = nn.Parameter(torch.zeros(n_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.rank:
            y = y + F.linear(F.linear(x, self.a), self.b) * self.scale
        return y

    def merged(self) -> torch.Tensor:
        if not self.rank:
            return self.weight
        return self.weight + self.scale * (self.b @ self.a)


class _Block(nn.Module):
    def __init__(self, shape: Shape, w: Callable[[str], torch.Tensor], rank: int, alpha: float,
                 targets: Sequence[str]) -> None:
        super().__init__()
        self.shape = shape
        self.attn_norm: torch.Tensor
        self.ffn_norm: torch.Tensor
        self.register_buffer("attn_norm", w("attn_norm"))
        self.register_buffer("ffn_norm", w("ffn_norm"))
        self.proj = nn.ModuleDict({key: Adapted(w(_NAMES[key]), rank if key in targets else 0,
                                                alpha) for key in TARGETS})

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                past: Past | None) -> tuple[torch.Tensor, Past]:
        """The block over x (batch, T, n_embd) at positions len(past)..., attending to `past`
        (batch 1 or the same batch) and causally to itself; returns the output and the keys
        and values now known."""
        s, p = self.shape, self.proj
        batch, length, _ = x.shape
        h = _rms_norm(x, self.attn_norm, s.rms_eps)
        q = _rope(p["q"](h).view(batch, length, s.n_head, s.head_dim), cos, sin)
        k = _rope(p["k"](h).view(batch, length, s.n_head_kv, s.head_dim), cos, sin)
        v = p["v"](h).view(batch, length, s.n_head_kv, s.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        seen = 0
        if past is not None:
            seen = past[0].shape[2]
            k = torch.cat((past[0].expand(batch, -1, -1, -1), k), 2)
            v = torch.cat((past[1].expand(batch, -1, -1, -1), v), 2)
        group = s.n_head // s.n_head_kv  # query head i reads key/value head i // group
        kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        if seen:
            now = torch.arange(seen, seen + length)
            mask = torch.arange(seen + length)[None, :] <= now[:, None]
            att = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        else:
            att = F.scaled_dot_product_attention(q, kk, vv, is_causal=length > 1)
        x = x + p["o"](att.transpose(1, 2).reshape(batch, length, -1))
        h = _rms_norm(x, self.ffn_norm, s.rms_eps)
        out: torch.Tensor = x + p["down"](F.silu(p["gate"](h)) * p["up"](h))
        return out, (k, v)


class Tuned(nn.Module):
    """The pretrained llama with adapters on the top `layers` blocks."""

    def __init__(self, shape: Shape, weights: dict[str, npt.NDArray[np.float32]], *,
                 rank: int, alpha: float, layers: int = 0,
                 targets: Sequence[str] = TARGETS) -> None:
        super().__init__()
        self.shape = shape

        def tensor(name: str) -> torch.Tensor:
            if name not in weights:
                raise ValueError(f"the base has no tensor {name}")
            return torch.from_numpy(weights[name])

        self.embed: torch.Tensor
        self.norm: torch.Tensor
        self.register_buffer("embed", tensor("token_embd.weight"))
        self.register_buffer("norm", tensor("output_norm.weight"))
        self.output: torch.Tensor | None = None
        if not shape.tied:
            self.register_buffer("output", tensor("output.weight"))
        first = shape.n_layer - layers if 0 < layers <= shape.n_layer else 0

        def block(i: int) -> _Block:
            return _Block(shape, lambda name: tensor(f"blk.{i}.{name}.weight"),
                          rank if i >= first else 0, alpha, targets)

        self.blocks = nn.ModuleList(block(i) for i in range(shape.n_layer))
        half = shape.head_dim // 2
        freqs = shape.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2 / shape.head_dim)
        self._freqs = freqs

    def _angles(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (length, 1, head_dim / 2) of positions start.., broadcast over heads."""
        pos = torch.arange(start, start + length, dtype=torch.float64)
        angles = pos[:, None] * self._freqs[None, :]
        return angles.cos().float()[:, None, :], angles.sin().float()[:, None, :]

    def run(self, ids: torch.Tensor, past: list[Past] | None = None
            ) -> tuple[torch.Tensor, list[Past]]:
        """Hidden states (batch, T, n_embd) of ids (batch, T) following `past` (every block's
        keys and values of the positions before, batch 1 or the same batch), and the keys and
        values up to the end of ids."""
        start = 0 if past is None else past[0][0].shape[2]
        cos, sin = self._angles(start, ids.shape[1])
        x = F.embedding(ids, self.embed)
        known: list[Past] = []
        for index, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, None if past is None else past[index])
            known.append(kv)
        return x, known

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed if self.output is None else self.output
        return F.linear(_rms_norm(hidden, self.norm, self.shape.rms_eps), weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, T, n_vocab) at every position of ids."""
        return self.logits(self.run(ids)[0])

    def tensors(self) -> list[tuple[str, npt.NDArray[np.float32]]]:
        """Every weight with the adapters merged, under llama.cpp's names, float32."""
        def arr(t: torch.Tensor) -> npt.NDArray[np.float32]:
            return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))

        out = [("token_embd.weight", arr(self.embed))]
        for i, block in enumerate(self.blocks):
            assert isinstance(block, _Block)
            out += [(f"blk.{i}.attn_norm.weight", arr(block.attn_norm)),
                    (f"blk.{i}.ffn_norm.weight", arr(block.ffn_norm))]
            for key in TARGETS:
                proj = block.proj[key]
                assert isinstance(proj, Adapted)
                out.append((f"blk.{i}.{_NAMES[key]}.weight", arr(proj.merged())))
        out.append(("output_norm.weight", arr(self.norm)))
        if self.output is not None:
            out.append(("output.weight", arr(self.output)))
        return out


def load(path: Path, plan: Plan) -> Tuned:
    """The base GGUF as a Tuned model with fresh adapters (seeded by plan.seed)."""
    shape, weights = pretrained.read_llama(path)
    torch.manual_seed(plan.seed)
    return Tuned(shape, weights, rank=plan.rank, alpha=plan.alpha, layers=plan.layers,
                 targets=plan.targets)


def answer_logits(model: Tuned, inputs: torch.Tensor, shared: int,
                  at: torch.Tensor) -> torch.Tensor:
    """Logits (batch, n, n_vocab) at positions `at` (batch, n) of inputs, whose rows share their
    first `shared` tokens: those run once, as one row, the rest of each row after them."""
    _, past = model.run(inputs[:1, :shared])
    hidden, _ = model.run(inputs[:, shared:], past)
    rows = torch.arange(inputs.shape[0])[:, None]
    return model.logits(hidden[rows, at - shared])


def train(model: Tuned, plan: Plan, data: Sequence[Tokens],
          progress: Callable[[Progress], None], *, progress_every: int = 5) -> Tuned:
    """Train the adapters on `data` for plan.steps steps of plan.batch sequences (drawn without
    replacement, reshuffled each pass), AdamW with warm-up then cosine decay."""
    if not data:
        raise ValueError("no training sequences")
    if max(len(s.ids) for s in data) > model.shape.n_ctx_train:
        raise ValueError(f"a training sequence is longer than the base's context "
                         f"({model.shape.n_ctx_train})")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no adapters to train")
    generator = torch.Generator().manual_seed(plan.seed)
    optimizer = torch.optim.AdamW(params, lr=plan.lr, betas=(0.9, 0.99),
                                  weight_decay=plan.weight_decay)

    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(plan.warmup_steps, plan.steps))
    started, cpu, running = time.monotonic(), time.process_time(), 0.0
    model.train()
    for step, picked in enumerate(batches(data, plan.batch, plan.steps, generator)):
        inputs, shared, at, targets = _batch(picked)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=plan.bf16):
            logits = answer_logits(model, inputs, shared, at)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.view(-1),
                               ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        running = loss.item() if step == 0 else 0.8 * running + 0.2 * loss.item()
        if (step + 1) % progress_every == 0 or step + 1 == plan.steps:
            progress(Progress(step + 1, plan.steps, running, time.monotonic() - started,
                              time.process_time() - cpu))
    model.eval()
    return model


class Greedy:
    """Argmax continuations, the keys and values of a common prompt head computed once."""

    def __init__(self, model: Tuned, head: list[int]) -> None:
        self.model, self.head = model, list(head)
        with torch.no_grad():
            self._past = model.run(torch.tensor([head]))[1] if head else None

    def __call__(self, prompt: list[int], *, eos_id: int, max_new: int) -> list[int]:
        """The argmax continuation of `prompt` up to EOS (excluded) or `max_new` tokens."""
        past = self._past
        rest = prompt
        if past is not None and prompt[:len(self.head)] == self.head and \
                len(prompt) > len(self.head):
            rest = prompt[len(self.head):]
        else:
            past = None
        out: list[int] = []
        with torch.no_grad():
            hidden, past = self.model.run(torch.tensor([rest]), past)
            for _ in range(max_new):
                token = int(self.model.logits(hidden[0, -1]).argmax())
                if token == eos_id:
                    break
                out.append(token)
                hidden, past = self.model.run(torch.tensor([[token]]), past)
        return out


def common_head(prompts: Sequence[list[int]]) -> list[int]:
    """The longest head every prompt shares, short of each prompt's last token."""
    head = list(prompts[0])
    for prompt in prompts[1:]:
        n = 0
        while n < min(len(head), len(prompt)) and head[n] == prompt[n]:
            n += 1
        head = head[:n]
    return head[:min(len(head), min(len(p) for p in prompts) - 1)]


@dataclass(frozen=True, slots=True)
class Outcome:
    files: dict[str, Path]
    scores: list[Scores]
    torch_texts: list[str]
    held: list[examples.Sample]
    times_s: dict[str, float]


def fine_tune(request: Request, base: Path, plan: Plan, log: TextIO | None = None, *,
              eval_threads: int | None = None) -> Outcome:
    """`specialize --from-base`: the labels of `request` (its rule or labels file, its route and
    configuration), `base` fine-tuned by `plan`, exported with the base's metadata, quantized
    and every file evaluated on the held-out set, as run.specialize does for the student:
    the quantized files first, the float32 one last; report.json is rewritten after each.
    Evaluation uses the configuration's thread counts unless `eval_threads` is given."""
    log = log or sys.stdout
    say = printer(log)
    started = time.monotonic()
    times: dict[str, float] = {}
    settings, route = find_route(request.config, request.route)
    model = load(base, plan)  # first: a file that is no llama GGUF is refused before any work
    out = request.out
    out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(train_examples=plan.train_examples, eval_examples=plan.eval_examples,
                    seed=plan.seed)
    train_set, held, source = labelled(replace(request, recipe=recipe), route, say)
    train_set = train_set[:plan.steps * plan.batch]  # each example seen once at most
    say(f"route {route.name}: {len(train_set)} training and {len(held)} held-out examples")
    tokenizer = llamacpp.Tokenizer(base)
    data = [Tokens(*tokenizer.example_ids(e.messages(route), e.answer)) for e in train_set]
    torch.set_num_threads(request.threads)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times["data_s"] = time.monotonic() - started
    say(f"base {base.name}: {model.shape.n_layer} layers x {model.shape.n_embd}; sequences up "
        f"to {max(len(d.ids) for d in data)} tokens; {n_trained} adapter weights (rank "
        f"{plan.rank}); {plan.steps} steps of {plan.batch}")

    mark, cpu = time.monotonic(), time.process_time()
    train(model, plan, data, lambda p: say(
        f"step {p.step}/{p.steps} loss {p.loss:.4f} elapsed {p.elapsed_s:.1f} s "
        f"(cpu {p.cpu_s:.1f} s)"))
    times["train_s"] = time.monotonic() - mark
    times["train_cpu_s"] = time.process_time() - cpu

    mark = time.monotonic()
    name = f"{route.name}-finetuned"
    files = {"f32": pretrained.write_like(base, out / f"{name}-f32.gguf", model.tensors(),
                                          name=name)}
    for kind in request.quants:
        files[kind] = llamacpp.quantize(files["f32"], out / f"{name}-{kind}.gguf", kind)
    times["export_s"] = time.monotonic() - mark

    mark = time.monotonic()
    torch_texts = torch_answers(model, tokenizer, route, held[:plan.torch_check])
    times["torch_greedy_s"] = time.monotonic() - mark
    examples.write_jsonl(out / "eval.jsonl", held)
    (out / "recipe.json").write_text(json.dumps(
        {"route": route.name, "base": str(base), "plan": plan.to_json(), "labels": source,
         "adapter_weights": n_trained}, indent=2) + "\n")
    mark = time.monotonic()
    scores: list[Scores] = []
    candidates = [(k, files[k]) for k in (*request.quants, "f32")]
    if request.base is not None:
        candidates.append(("base", request.base))
    threads = settings.model.n_threads if eval_threads is None else eval_threads
    batch_threads = settings.model.threads_batch if eval_threads is None else eval_threads
    for label, path in candidates:
        scores.append(evaluate(label, path, route, held, n_ctx=2048, n_threads=threads,
                               n_threads_batch=batch_threads, note=say))
        say(f"{label}: accuracy {scores[-1].accuracy:.3f}")
        times["eval_s"] = time.monotonic() - mark
        times["total_s"] = time.monotonic() - started
        write_report(out / "report.json", scores, [agrees(s, torch_texts) for s in scores],
                     held, times, torch_checked=len(torch_texts))
    agreement = {s.label: agrees(s, torch_texts) for s in scores}
    print(table(scores, None), file=log)
    say("= torch (first {}): {}".format(len(torch_texts), ", ".join(
        f"{k} {v:.3f}" for k, v in agreement.items())))
    say(f"data {times['data_s']:.0f} s, training {times['train_s']:.0f} s "
        f"(cpu {times['train_cpu_s']:.0f} s), export {times['export_s']:.0f} s, evaluation "
        f"{times['eval_s']:.0f} s, total {times['total_s']:.0f} s; written to {out}")
    return Outcome(files, scores, torch_texts, held, times)


def torch_answers(model: Tuned, tokenizer: llamacpp.Tokenizer, route: Route,
                  held: Sequence[examples.Sample]) -> list[str]:
    """The torch model's own greedy answers (no grammar) to `held`."""
    if not held:
        return []
    prompts = [tokenizer.prompt_ids(e.messages(route)) for e in held]
    decode = Greedy(model, common_head(prompts))
    return [tokenizer.detokenize(decode(p, eos_id=tokenizer.eos_id, max_new=route.max_tokens))
            for p in prompts]


def agrees(scores: Scores, torch_texts: list[str]) -> float:
    """The share of the first len(torch_texts) answers identical to the torch model's."""
    if not torch_texts:
        return float("nan")
    return sum(a == b for a, b in zip(scores.texts, torch_texts, strict=False)) / len(torch_texts)

