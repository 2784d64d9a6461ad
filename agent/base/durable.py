"""Durable file writes (STYLE rule 5): what the agent relies on after a crash is written to a
file, fsynced, renamed into place and its directory fsynced, so a SIGKILL or a power cut leaves
the old version or the new one, never half of either.

Used for the OTA state, packages handed over through incoming/, model command records and the
quarantine of a damaged database. Blocking: callers on the event loop use a thread. Owns no
decisions about what is written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_BLOCK = 1 << 20


def fsync_dir(directory: Path) -> None:
    """Make renames and new names in `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync `path` (a new file in a directory still to be renamed into place)."""
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def copy_file(source: Path, target: Path) -> None:
    """Copy and fsync, 1 MiB at a time."""
    with source.open("rb") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, _BLOCK)
        dst.flush()
        os.fsync(dst.fileno())


def replace(path: Path, data: bytes) -> None:
    """Temp file in the same directory, write, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_file(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)
