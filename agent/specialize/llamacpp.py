"""llama.cpp for the specializer: its tokenizer, its quantizer and its engine. The only module
of agent/specialize importing llama_cpp (the daemon's own is agent/inference/worker.py, whose
Engine the evaluation reuses, so a model is measured the way the agent runs it).

Training must see exactly the token ids llama.cpp sees at inference, so the prompt is rendered
the way llama-cpp-python's create_chat_completion renders it (its Jinja2ChatFormatter on the
GGUF's own chat template; llama_cpp/llama.py) and tokenized by llama.cpp itself, from a
vocabulary-only load of the student's GGUF: no second tokenizer to drift from the first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llama_cpp import Llama
from llama_cpp import llama_cpp as lib
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from agent.inference.worker import Engine

# Quantizations made from the float32 export: name -> llama.cpp's llama_ftype.
FTYPES = {"f16": lib.LLAMA_FTYPE_MOSTLY_F16, "q8_0": lib.LLAMA_FTYPE_MOSTLY_Q8_0,
          "q4_0": lib.LLAMA_FTYPE_MOSTLY_Q4_0}


class Tokenizer:
    """A GGUF's tokenizer and chat template, as llama-cpp-python applies them to a chat."""

    def __init__(self, gguf_path: Path) -> None:
        self._llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{gguf_path}: no tokenizer.chat_template")
        self.eos_id = int(self._llm.token_eos())
        self._format = Jinja2ChatFormatter(
            template=template, eos_token=self._llm._model.token_get_text(self.eos_id),
            bos_token=self._llm._model.token_get_text(self._llm.token_bos()),
            stop_token_ids=[self.eos_id])

    def render(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """The prompt text and whether llama-cpp-python adds BOS before it (it does not when
        the formatter says the template placed its own special tokens)."""
        result: Any = self._format(messages=messages)  # type: ignore[arg-type]
        return str(result.prompt), not result.added_special

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return [int(t) for t in self._llm.tokenize(text.encode(), add_bos=add_bos, special=True)]

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The ids create_chat_completion evaluates for these messages."""
        text, add_bos = self.render(messages)
        return self.tokenize(text, add_bos=add_bos)

    def example_ids(self, messages: list[dict[str, str]], answer: str) -> tuple[list[int], int]:
        """(prompt ids + answer ids + EOS, number of prompt ids). The answer is tokenized after
        the prompt, as one text, and the prompt's ids must come out unchanged at its head."""
        text, add_bos = self.render(messages)
        prompt = self.tokenize(text, add_bos=add_bos)
        whole = self.tokenize(text + answer, add_bos=add_bos)
        if whole[:len(prompt)] != prompt:
            raise ValueError(f"the answer {answer!r} changes how the prompt tokenizes")
        return [*whole, self.eos_id], len(prompt)

    def detokenize(self, ids: list[int]) -> str:
        return bytes(self._llm.detokenize(ids)).decode("utf-8", errors="replace")


def quantize(source: Path, target: Path, kind: str) -> Path:
    """Quantize a float32 GGUF with llama.cpp's own quantizer (`llama_model_quantize`)."""
    params = lib.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = 2
    status = lib.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize {source} -> {kind} failed with {status}")
    return target


def open_engine(path: Path, *, n_ctx: int, n_threads: int | None,
                n_threads_batch: int | None) -> Engine:
    """The agent worker's Engine on this file, loaded as the worker loads a model (threads
    None: llama-cpp-python's defaults, as in a worker started without them)."""
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads,
                n_threads_batch=n_threads_batch, seed=0, verbose=False)
    return Engine(llm)
