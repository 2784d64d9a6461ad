"""Deterministic generator of a tiny llama-architecture GGUF model.

This tool owns the synthetic model that edge-agent's tests and benchmarks load
through llama.cpp (llama-cpp-python): random float32 weights, a small
SentencePiece-style ("llama") vocabulary with byte fallback, and a plain-text
chat template (both agent/specialize/vocab.py's base, which the specialized
students extend). The answers are nonsense, but the file loads, tokenizes and
generates, including under a JSON-schema grammar. The same arguments always
give a byte-identical file (seeded numpy Generator, no timestamps, fixed order).

Usage: python tools/make_tiny_model.py OUT.gguf [--preset tiny|bench] [--seed N]
       [--n-embd N] [--n-layer N] [--n-head N] [--n-ff N] [--n-ctx N] [--name NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.specialize.export import write_gguf
from agent.specialize.recipe import Recipe
from agent.specialize.vocab import base_vocab


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the generated model."""

    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    n_ctx: int = 2048
    name: str = "tiny-llama"


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(n_embd=64, n_layer=2, n_head=4, n_ff=128),  # ~0.5 MB
    "bench": ModelConfig(n_embd=512, n_layer=8, n_head=8, n_ff=320),  # ~50 MB
}

Tensor = npt.NDArray[np.float32]
INIT_SCALE = np.float32(0.02)


def _weights(rng: np.random.Generator, *shape: int) -> Tensor:
    """Small normal init; numpy shape is (rows, cols) = ggml ne reversed."""
    out = rng.standard_normal(shape, dtype=np.float32) * INIT_SCALE
    return np.ascontiguousarray(out, dtype=np.float32)


def build_tensors(cfg: ModelConfig, n_vocab: int, seed: int) -> list[tuple[str, Tensor]]:
    """All model tensors in a fixed order. gguf-py writes ne = reversed(numpy shape)."""
    rng = np.random.default_rng(seed)
    e, ff = cfg.n_embd, cfg.n_ff
    ones = np.ones(e, dtype=np.float32)
    tensors: list[tuple[str, Tensor]] = [
        ("token_embd.weight", _weights(rng, n_vocab, e)),  # ne {n_embd, n_vocab}
    ]
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        tensors += [
            (p + "attn_norm.weight", ones.copy()),
            (p + "attn_q.weight", _weights(rng, e, e)),
            (p + "attn_k.weight", _weights(rng, e, e)),  # n_head_kv == n_head
            (p + "attn_v.weight", _weights(rng, e, e)),
            (p + "attn_output.weight", _weights(rng, e, e)),
            (p + "ffn_norm.weight", ones.copy()),
            (p + "ffn_gate.weight", _weights(rng, ff, e)),  # ne {n_embd, n_ff}
            (p + "ffn_up.weight", _weights(rng, ff, e)),
            (p + "ffn_down.weight", _weights(rng, e, ff)),  # ne {n_ff, n_embd}
        ]
    tensors += [
        ("output_norm.weight", ones.copy()),
        ("output.weight", _weights(rng, n_vocab, e)),  # ne {n_embd, n_vocab}
    ]
    for name, arr in tensors:
        if arr.dtype != np.float32:  # float64 loads but crashes llama.cpp at decode
            raise TypeError(f"{name} is {arr.dtype}, expected float32")
    return tensors


def resolve_config(preset: str, **overrides: int | str) -> ModelConfig:
    """Preset values with explicit overrides applied and validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    values: dict[str, Any] = dataclasses.asdict(PRESETS[preset])
    for key, value in overrides.items():
        if key not in values:
            raise TypeError(f"unknown model parameter {key!r}; known: {sorted(values)}")
        if type(value) is not type(values[key]):  # rejects bool and float sizes too
            raise TypeError(f"{key} must be {type(values[key]).__name__}, got {value!r}")
        values[key] = value
    cfg = ModelConfig(**values)
    if min(cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_ff, cfg.n_ctx) <= 0:
        raise ValueError(f"all sizes must be positive: {cfg}")
    if cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 2:
        raise ValueError("n_embd must be a multiple of n_head with an even head size")
    return cfg


def make_model(path: Path, *, preset: str = "tiny", seed: int = 0, **overrides: int | str) -> Path:
    """Write the model to ``path`` (atomically, via a temporary sibling) and return ``path``.

    The header and the vocabulary are the specialized students' (agent/specialize/export.py
    and vocab.py): one writer for every llama GGUF this project makes.
    """
    cfg = resolve_config(preset, **overrides)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = Recipe(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_ff=cfg.n_ff,
                   n_ctx=cfg.n_ctx)
    vocab = base_vocab()
    return write_gguf(path, shape, vocab, build_tensors(cfg, len(vocab.tokens), seed),
                      name=cfg.name)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: write the model, print "PATH SIZE SHA256"."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", type=Path, help="output .gguf path")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    for flag in ("n-embd", "n-layer", "n-head", "n-ff", "n-ctx"):
        parser.add_argument(f"--{flag}", type=int, default=None)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    keys = ("n_embd", "n_layer", "n_head", "n_ff", "n_ctx", "name")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    try:
        path = make_model(args.out, preset=args.preset, seed=args.seed, **overrides)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"{path} {path.stat().st_size} {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
