"""GGUF export: the student's float32 tensors and vocabulary written as a llama-architecture
GGUF file that llama.cpp loads. The only module of agent/specialize importing gguf.

Tensors are numpy float32 (float64 loads but crashes llama.cpp at decode); gguf-py writes a
tensor's ggml shape (ne) as its numpy shape reversed, so a torch Linear weight (out, in) is
ggml's {in, out}, which is what llama.cpp's llama graph expects.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

from agent.specialize.recipe import RMS_EPS, ROPE_FREQ_BASE, Recipe
from agent.specialize.vocab import BOS_ID, CHAT_TEMPLATE, EOS_ID, UNK_ID, Vocab

Tensor = npt.NDArray[np.float32]


def write_gguf(path: Path, recipe: Recipe, vocab: Vocab, tensors: list[tuple[str, Tensor]],
               *, name: str) -> Path:
    """Write the model (or, with no tensors, a vocabulary-only file llama.cpp can tokenize
    with) atomically to `path`."""
    for tensor_name, arr in tensors:
        if arr.dtype != np.float32:
            raise TypeError(f"{tensor_name} is {arr.dtype}, expected float32")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write(tmp, recipe, vocab, tensors, name)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write(out: Path, recipe: Recipe, vocab: Vocab, tensors: list[tuple[str, Tensor]],
           name: str) -> None:
    writer = gguf.GGUFWriter(out, "llama")
    try:
        writer.add_name(name)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        writer.add_vocab_size(len(vocab.tokens))
        writer.add_context_length(recipe.n_ctx)
        writer.add_embedding_length(recipe.n_embd)
        writer.add_block_count(recipe.n_layer)
        writer.add_feed_forward_length(recipe.n_ff)
        writer.add_head_count(recipe.n_head)
        writer.add_head_count_kv(recipe.n_head)
        writer.add_layer_norm_rms_eps(RMS_EPS)
        writer.add_rope_freq_base(ROPE_FREQ_BASE)
        writer.add_rope_dimension_count(recipe.head_dim)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(vocab.tokens)
        writer.add_token_scores(vocab.scores)
        writer.add_token_types(vocab.types)
        writer.add_unk_token_id(UNK_ID)
        writer.add_bos_token_id(BOS_ID)
        writer.add_eos_token_id(EOS_ID)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)
        for tensor_name, arr in tensors:
            writer.add_tensor(tensor_name, np.ascontiguousarray(arr))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
