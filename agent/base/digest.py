"""The sha256 of a file, read in 1 MiB blocks: how a model file is named (inference), checked
against its manifest (modelpkg) and checked after a download (download).

Blocking: callers on the event loop run it with `asyncio.to_thread`. Owns nothing else.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
