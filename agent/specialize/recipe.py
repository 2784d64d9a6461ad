"""The recipe of a student: its shape (llama hyper-parameters) and how it is trained.

Recorded next to the model (recipe.json), so the same recipe and seed retrain the same model.
Pure data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ROPE_FREQ_BASE = 10000.0  # llama.cpp's default for the llama architecture
RMS_EPS = 1e-5
QUANT_BLOCK = 32  # q4_0 and q8_0 quantize rows in blocks of 32 values


@dataclass(frozen=True, slots=True)
class Recipe:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_ff: int = 128
    n_ctx: int = 512
    steps: int = 1500
    batch: int = 32
    lr: float = 4e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    train_examples: int = 6000
    eval_examples: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("n_embd", "n_layer", "n_head", "n_ff", "n_ctx", "steps", "batch",
                    "train_examples", "eval_examples"):
            if getattr(self, key) <= 0:
                raise ValueError(f"recipe: {key} must be positive, got {getattr(self, key)}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"recipe: n_embd ({self.n_embd}) must be a multiple of n_head "
                             f"({self.n_head}) with an even head size")
        for key in ("n_embd", "n_ff"):
            if getattr(self, key) % QUANT_BLOCK:
                raise ValueError(f"recipe: {key} ({getattr(self, key)}) must be a multiple of "
                                 f"{QUANT_BLOCK}, the quantizers' block")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
