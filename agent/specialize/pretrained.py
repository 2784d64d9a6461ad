"""A pretrained llama GGUF in, a fine-tuned copy out: the base's tensors dequantized to float32
numpy arrays under llama.cpp's names with the hyper-parameters its metadata gives, and a GGUF
written with new tensors and every metadata field of the base (tokenizer, merges, chat
template, special tokens), so the fine-tuned model tokenizes and templates exactly as the base.

Tensors stay in the GGUF's layout: llama.cpp's converter (convert_hf_to_gguf.py,
LlamaModel.permute) stored the attention Q and K rows of a Hugging Face checkpoint permuted
for the rotary mode llama.cpp runs the llama architecture in (adjacent pairs rotated), which is
the mode agent/specialize/student.py computes; weights read here therefore go into that rotary
code unchanged and come back out unchanged, with no permutation either way.

Imports gguf (as export.py does); no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

Tensor = npt.NDArray[np.float32]
# Written by GGUFWriter itself or describing the old file's tensors: never copied.
_NOT_COPIED = ("general.architecture", "general.file_type", "general.name",
               "general.quantization_version")


@dataclass(frozen=True, slots=True)
class Shape:
    """A llama model's hyper-parameters, as its GGUF metadata gives them."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    rope_base: float
    rms_eps: float
    tied: bool  # no output.weight: the output layer is token_embd's

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def read_llama(path: Path) -> tuple[Shape, dict[str, Tensor]]:
    """The model in a llama-architecture GGUF: its shape and every tensor as float32, in numpy
    order (ggml's ne reversed: a weight is (out, in), as a torch Linear holds it)."""
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError) as exc:  # gguf's errors for a file that is not GGUF
        raise ValueError(f"{path}: not a GGUF file ({exc})") from exc

    def value(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        if field is None:
            if default is None:
                raise ValueError(f"{path}: no {key} in the metadata")
            return default
        return field.contents()

    arch = value("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, only 'llama' can be fine-tuned")
    tensors: dict[str, Tensor] = {}
    for tensor in reader.tensors:
        dims = tuple(int(n) for n in reversed(tensor.shape))
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        # A copy: a float32 tensor's data is a read-only view of the memory-mapped file.
        tensors[tensor.name] = np.array(data, dtype=np.float32, copy=True).reshape(dims)
    n_embd = int(value("llama.embedding_length"))
    n_head = int(value("llama.attention.head_count"))
    shape = Shape(
        n_vocab=tensors["token_embd.weight"].shape[0], n_embd=n_embd,
        n_layer=int(value("llama.block_count")), n_head=n_head,
        n_head_kv=int(value("llama.attention.head_count_kv", n_head)),
        n_ff=int(value("llama.feed_forward_length")),
        n_ctx_train=int(value("llama.context_length")),
        rope_base=float(value("llama.rope.freq_base", 10000.0)),
        rms_eps=float(value("llama.attention.layer_norm_rms_epsilon")),
        tied="output.weight" not in tensors)
    rope_dims = int(value("llama.rope.dimension_count", shape.head_dim))
    if rope_dims != shape.head_dim:
        raise ValueError(f"{path}: llama.rope.dimension_count {rope_dims} is not the head size "
                         f"{shape.head_dim}; partial rotary embedding is not supported")
    if "llama.rope.scaling.type" in reader.fields:
        raise ValueError(f"{path}: rope scaling ({value('llama.rope.scaling.type')}) is not "
                         f"supported")
    return shape, tensors


def write_like(base: Path, path: Path, tensors: list[tuple[str, Tensor]], *, name: str) -> Path:
    """Write `tensors` (float32) as a GGUF carrying every metadata field of `base` (but its
    name and file type), atomically to `path`."""
    for tensor_name, arr in tensors:
        if arr.dtype != np.float32:
            raise TypeError(f"{tensor_name} is {arr.dtype}, expected float32")
    reader = gguf.GGUFReader(base)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in _NOT_COPIED:
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        writer.add_name(name)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        for tensor_name, arr in tensors:
            writer.add_tensor(tensor_name, np.ascontiguousarray(arr))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
