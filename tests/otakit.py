"""Real model packages for the OTA tests: a signing key, generated GGUF models of several
versions and behaviours, signed with agent.modelpkg exactly as `edge-agent model sign` does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.base import signing
from agent.ota import modelpkg
from tools.make_tiny_model import make_model

CANARY = [{"route": "temperature", "payload": {"sensor": "canary", "celsius": 81.5}}]
# A bigger llama: a few tens of times slower per answer than the tiny one, but valid.
SLOW = {"n_embd": 512, "n_layer": 8, "n_ff": 1024}


def keypair(directory: Path, name: str = "release") -> tuple[Path, str]:
    key = directory / f"{name}.pem"
    if key.exists():
        return key, signing.public_key_of(key)
    return key, signing.generate(key)


def package(workdir: Path, key: Path, version: str, *, seed: int = 0, name: str = "tiny-ota",
            canary: list[dict[str, Any]] | None = None, min_agent_version: str | None = None,
            golden: list[tuple[str, Path, float]] | None = None, gguf: Path | None = None,
            **model: int) -> Path:
    """A signed package directory `workdir/pkg-<version>` around a freshly generated GGUF
    (or `gguf`), with `golden` sets when given."""
    if gguf is None:
        gguf = make_model(workdir / f"src-{version}" / f"{name}-{version}.gguf", seed=seed,
                          **model)
    out = workdir / f"pkg-{version}"
    modelpkg.build(gguf, out, name=name, version=version, n_ctx=512,
                   canary=CANARY if canary is None else canary, key=key,
                   min_agent_version=min_agent_version, golden=golden or [])
    return out


def write_golden(path: Path, items: list[tuple[str, Any, Any]]) -> Path:
    """A golden JSONL file of (topic, reading, expected output) items, as specialize writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"topic": topic, "reading": reading, "output": output})
                            + "\n" for topic, reading, output in items), encoding="utf-8")
    return path


def wrong_shapes_package(workdir: Path, key: Path, version: str) -> Path:
    """A validly signed GGUF whose metadata says n_embd=128 while its tensors have 64."""
    gguf = make_model(workdir / f"src-{version}" / f"broken-{version}.gguf", seed=5)
    data = bytearray(gguf.read_bytes())
    marker = b"llama.embedding_length"
    at = data.index(marker) + len(marker) + 4  # then the uint32 type tag, then the value
    assert int.from_bytes(data[at:at + 4], "little") == 64
    data[at:at + 4] = (128).to_bytes(4, "little")
    gguf.write_bytes(bytes(data))
    out = workdir / f"pkg-{version}"
    modelpkg.build(gguf, out, name="broken", version=version, n_ctx=512, canary=CANARY, key=key)
    return out
