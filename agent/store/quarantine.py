"""A corrupt store file, moved aside at open so that a fresh store can start.

Owns `quarantine_if_corrupt`: `PRAGMA quick_check` on an existing database before the writer
connection opens it, and, when the file is damaged, a durable move of it (with its -wal and
-shm) to `<dir>/quarantine/<UTC time>/` for an operator. Runs on agent/store/writer.py's writer
thread, before that thread opens its connection; it must not run while a connection to the file is
open, must not delete a damaged file, and must not quarantine one for an error that is not
corruption (locked, I/O error, disk full: those are raised).
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from agent.base import durable


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A database that failed `quick_check` at open and was moved aside."""

    directory: Path
    reason: str
    files: list[str]


def quarantine_if_corrupt(path: Path) -> Quarantined | None:
    """Run `PRAGMA quick_check` on an existing database; if it is damaged, move it (and its
    -wal and -shm) to `<dir>/quarantine/<UTC time>/` durably, so a fresh store can start and
    the damaged one is kept for an operator. Errors other than corruption are raised."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    reason = _quick_check(path)
    if reason is None:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.parent / "quarantine" / f"{stamp}-{time.monotonic_ns() % 10**6:06d}"
    target.mkdir(parents=True)
    moved = []
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            os.replace(source, target / source.name)
            moved.append(source.name)
    for directory in (target, target.parent, path.parent):
        durable.fsync_dir(directory)
    return Quarantined(target, reason, moved)


def _quick_check(path: Path) -> str | None:
    """None if the database is sound, else why not."""
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            rows = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
        finally:
            conn.close()
    except sqlite3.OperationalError:
        raise  # locked, I/O error, disk full: not evidence of a damaged file
    except sqlite3.DatabaseError as exc:  # SQLITE_CORRUPT, SQLITE_NOTADB
        return f"{getattr(exc, 'sqlite_errorname', type(exc).__name__)}: {exc}"
    if rows == ["ok"]:
        return None
    return "quick_check: " + "; ".join(rows[:5])


