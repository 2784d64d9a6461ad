"""Model packages: the manifest, its canonical bytes, version order, and verification.

A package is a directory holding the GGUF file, `manifest.json` and `manifest.sig` (the base64
ed25519 signature of the manifest's canonical bytes: JSON with sorted keys, no spaces, UTF-8).
Verification runs in this order and stops at the first failure, so llama.cpp never parses a
file that is not exactly the one a trusted key signed: signature -> declared size -> sha256
(all in a thread, off the event loop).

A package may carry golden sets (the optional manifest field "golden"): per route a JSONL file
of readings with their expected outputs (`edge-agent model specialize` writes eval.jsonl in that
shape) and the accuracy floor the candidate must reach on it (agent/ota/trial.py). Each golden
file is checked like the GGUF (declared size, then sha256) before anything loads; `load_golden`
parses one.

Versions are dotted numbers ("3", "1.2", "2024.11.5"): compared number by number, a missing
number counts as 0, so "1.2" == "1.2.0" < "1.10". Owns no state; agent/ota/state.py does.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.base import signing
from agent.base.digest import sha256_file
from agent.base.errors import PermanentError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = 1
_VERSION = re.compile(r"^\d{1,9}(\.\d{1,9}){0,5}$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_FILE = re.compile(r"^[A-Za-z0-9_.-]{1,128}\.gguf$")
_GOLDEN_FILE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}\.jsonl$")


class PackageRejected(PermanentError):
    """A model package failed verification; the message names the file and the check."""


def version_key(version: str) -> tuple[int, ...]:
    """The sort key of a dotted numeric version; trailing zeros do not count."""
    if not _VERSION.match(version):
        raise ValueError(f"version {version!r} is not dotted numbers like 3 or 1.2.0")
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def is_version(version: str) -> bool:
    return bool(_VERSION.match(version))


@dataclass(frozen=True, slots=True)
class Canary:
    """One canary prompt: a reading for a configured route, answered within a budget."""

    route: str
    payload: Any
    max_latency_ms: float | None


@dataclass(frozen=True, slots=True)
class Golden:
    """A golden set: a JSONL file of readings and expected outputs for one route, and the
    accuracy (exact match of the parsed output) the candidate must reach on it."""

    route: str
    file: str
    sha256: str
    size: int
    min_accuracy: float

    def to_json(self) -> dict[str, Any]:
        return {"route": self.route, "file": self.file, "sha256": self.sha256,
                "size": self.size, "min_accuracy": self.min_accuracy}


@dataclass(frozen=True, slots=True)
class GoldenItem:
    """One reading of a golden set: the topic and payload text the pipeline would see, and the
    output the model must give."""

    topic: str
    payload: str
    expected: Any


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    version: str
    file: str
    sha256: str
    size: int
    n_ctx: int
    canary: tuple[Canary, ...]
    min_agent_version: str | None
    golden: tuple[Golden, ...] = ()

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "format": FORMAT, "name": self.name, "version": self.version, "file": self.file,
            "sha256": self.sha256, "size": self.size, "n_ctx": self.n_ctx,
            "canary": [{"route": c.route, "payload": c.payload,
                        **({} if c.max_latency_ms is None else
                           {"max_latency_ms": c.max_latency_ms})} for c in self.canary],
        }
        if self.min_agent_version is not None:
            body["min_agent_version"] = self.min_agent_version
        if self.golden:
            body["golden"] = [g.to_json() for g in self.golden]
        return body


def package_files(manifest: Manifest) -> list[str]:
    """The names of the files a package's manifest signs for: the GGUF, then golden sets."""
    return [manifest.file, *(golden.file for golden in manifest.golden)]


@dataclass(frozen=True, slots=True)
class Verified:
    """A package whose signature, size and sha256 all checked out."""

    directory: Path
    manifest: Manifest
    key_id: str

    @property
    def gguf(self) -> Path:
        return self.directory / self.manifest.file


def canonical(body: dict[str, Any]) -> bytes:
    """The signed bytes: sorted keys, no whitespace, UTF-8. Any edited field changes them."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _field(body: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PackageRejected(f"{where}: field {key!r} must be {kind.__name__}")
    return value


def parse_manifest(body: Any, where: str) -> Manifest:
    """A Manifest from its JSON body; PackageRejected naming the field that is wrong."""
    if not isinstance(body, dict):
        raise PackageRejected(f"{where}: the manifest must be a JSON object")
    if body.get("format") != FORMAT:
        raise PackageRejected(f"{where}: field 'format' must be {FORMAT}")
    name = _field(body, "name", str, where)
    version = _field(body, "version", str, where)
    file = _field(body, "file", str, where)
    sha256 = _field(body, "sha256", str, where)
    size = _field(body, "size", int, where)
    n_ctx = _field(body, "n_ctx", int, where)
    if not _NAME.match(name):
        raise PackageRejected(f"{where}: field 'name' must match {_NAME.pattern}")
    if not is_version(version):
        raise PackageRejected(f"{where}: field 'version' must be dotted numbers, e.g. 1.2.0")
    if not _FILE.match(file):
        raise PackageRejected(f"{where}: field 'file' must be a plain *.gguf file name")
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise PackageRejected(f"{where}: field 'sha256' must be 64 lowercase hex digits")
    if size <= 0 or n_ctx < 64:
        raise PackageRejected(f"{where}: fields 'size' and 'n_ctx' must be positive (n_ctx>=64)")
    canaries = []
    for index, item in enumerate(_field(body, "canary", list, where)):
        if not isinstance(item, dict) or not isinstance(item.get("route"), str):
            raise PackageRejected(f"{where}: canary[{index}] needs a 'route' name")
        budget = item.get("max_latency_ms")
        if budget is not None and (not isinstance(budget, int | float) or budget <= 0):
            raise PackageRejected(f"{where}: canary[{index}].max_latency_ms must be positive")
        canaries.append(Canary(item["route"], item.get("payload", {}),
                               None if budget is None else float(budget)))
    minimum = body.get("min_agent_version")
    if minimum is not None and (not isinstance(minimum, str) or not is_version(minimum)):
        raise PackageRejected(f"{where}: field 'min_agent_version' must be dotted numbers")
    golden = _parse_golden(body, where, file)
    return Manifest(name, version, file, sha256, size, n_ctx, tuple(canaries), minimum, golden)


def _parse_golden(body: dict[str, Any], where: str, gguf: str) -> tuple[Golden, ...]:
    if "golden" not in body:
        return ()
    items = body["golden"]
    if not isinstance(items, list):
        raise PackageRejected(f"{where}: field 'golden' must be a list")
    sets: list[Golden] = []
    names = {gguf, MANIFEST, SIGNATURE}
    for index, item in enumerate(items):
        at = f"{where}: golden[{index}]"
        if not isinstance(item, dict):
            raise PackageRejected(f"{at} must be an object")
        route = _field(item, "route", str, at)
        file = _field(item, "file", str, at)
        sha256 = _field(item, "sha256", str, at)
        size = _field(item, "size", int, at)
        floor = item.get("min_accuracy")
        if not _GOLDEN_FILE.match(file):
            raise PackageRejected(f"{at}: field 'file' must be a plain *.jsonl file name")
        if file in names:
            raise PackageRejected(f"{at}: file {file!r} is named twice in the package")
        names.add(file)
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise PackageRejected(f"{at}: field 'sha256' must be 64 lowercase hex digits")
        if size <= 0:
            raise PackageRejected(f"{at}: field 'size' must be positive")
        if (not isinstance(floor, int | float) or isinstance(floor, bool)
                or not 0 <= floor <= 1):
            raise PackageRejected(f"{at}: field 'min_accuracy' must be a number from 0 to 1")
        sets.append(Golden(route, file, sha256, size, float(floor)))
    return tuple(sets)


def read_signed(directory: Path, trusted: list[str]) -> tuple[Manifest, str]:
    """Read the manifest and check its signature: (manifest, signing key id)."""
    manifest_path, sig_path = directory / MANIFEST, directory / SIGNATURE
    try:
        body = json.loads(manifest_path.read_bytes())
    except OSError as exc:
        raise PackageRejected(f"{manifest_path}: cannot read: {exc.strerror}") from exc
    except ValueError as exc:
        raise PackageRejected(f"{manifest_path}: not JSON: {exc}") from exc
    try:
        signature = sig_path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise PackageRejected(f"{sig_path}: unsigned package (no readable signature)") from exc
    try:
        key = signing.verify(canonical(body), signature, trusted)
    except signing.SignatureError as exc:
        raise PackageRejected(f"{manifest_path}: {exc}") from exc
    return parse_manifest(body, str(manifest_path)), key


def check_file(path: Path, manifest: Manifest) -> None:
    """Size first (cheap, catches truncation and appended bytes), then sha256. Blocking."""
    _check(path, "model file", manifest.size, manifest.sha256)


def check_golden(directory: Path, manifest: Manifest) -> None:
    """Each golden file's size, then its sha256, as for the GGUF. Blocking."""
    for golden in manifest.golden:
        _check(directory / golden.file, "golden file", golden.size, golden.sha256)


def _check(path: Path, what: str, declared_size: int, declared_sha256: str) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise PackageRejected(f"{path}: cannot read the {what}: {exc.strerror}") from exc
    if size != declared_size:
        raise PackageRejected(f"{path}: size {size} bytes, the manifest says {declared_size}")
    actual = sha256_file(path)
    if actual != declared_sha256:
        raise PackageRejected(f"{path}: sha256 {actual} does not match the manifest")


def load_golden(path: Path) -> list[GoldenItem]:
    """The items of a golden JSONL file: one {"topic": ..., "reading": ..., "output": ...} per
    line (a reading that is a JSON string is the payload text itself; anything else is sent
    as json.dumps of it, as `edge-agent model specialize` trains and evaluates). Blocking;
    PackageRejected naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PackageRejected(f"{path}: cannot read the golden file: {exc}") from exc
    items: list[GoldenItem] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise PackageRejected(f"{path}:{number}: not JSON: {exc}") from exc
        if (not isinstance(item, dict) or not isinstance(item.get("topic"), str)
                or "reading" not in item or "output" not in item):
            raise PackageRejected(f"{path}:{number}: needs 'topic' (a string), 'reading' "
                                  "and 'output'")
        reading = item["reading"]
        payload = reading if isinstance(reading, str) else json.dumps(reading)
        items.append(GoldenItem(item["topic"], payload, item["output"]))
    if not items:
        raise PackageRejected(f"{path}: the golden file has no items")
    return items


async def verify(directory: Path, trusted: list[str]) -> Verified:
    """Signature, then size and sha256, in one thread. PackageRejected says which failed."""
    return await asyncio.to_thread(verify_blocking, directory, trusted)


def verify_blocking(directory: Path, trusted: list[str]) -> Verified:
    """The same checks for the command line (no event loop) and for `verify`'s thread."""
    manifest, key = read_signed(directory, trusted)
    check_golden(directory, manifest)
    check_file(directory / manifest.file, manifest)
    return Verified(directory, manifest, key)


def build(gguf: Path, out_dir: Path, *, name: str, version: str, n_ctx: int,
          canary: list[dict[str, Any]], key: Path, min_agent_version: str | None = None,
          golden: Sequence[tuple[str, Path, float]] = ()) -> Manifest:
    """Write a signed package: the GGUF copied into `out_dir`, manifest.json, manifest.sig;
    with `golden` ((route, JSONL file, min_accuracy) each) the golden files too, each checked
    to parse first."""
    import shutil

    for _, path, _ in golden:
        load_golden(path)

    body: dict[str, Any] = {
        "format": FORMAT, "name": name, "version": version, "file": gguf.name,
        "sha256": sha256_file(gguf), "size": gguf.stat().st_size, "n_ctx": n_ctx,
        "canary": canary,
    }
    if min_agent_version is not None:
        body["min_agent_version"] = min_agent_version
    if golden:
        body["golden"] = [{"route": route, "file": path.name, "sha256": sha256_file(path),
                           "size": path.stat().st_size, "min_accuracy": floor}
                          for route, path, floor in golden]
    manifest = parse_manifest(body, "the new manifest")
    out_dir.mkdir(parents=True, exist_ok=True)
    for source in [gguf, *(path for _, path, _ in golden)]:
        if (out_dir / source.name).resolve() != source.resolve():
            shutil.copyfile(source, out_dir / source.name)
    (out_dir / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    (out_dir / SIGNATURE).write_text(signing.sign(canonical(body), key) + "\n")
    return manifest
