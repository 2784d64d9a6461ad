"""Removing directories the OTA flow is done with: staging copies, failed models, consumed
packages, download records.

A directory that cannot be removed (a file owned by another user, a read-only mount) costs disk
space, not the agent: `remove_tree` removes what it can, never raises, and logs
`ota_directory_not_removed` naming the directory and the entries that stayed, so an operator
learns that something was left behind. agent/ota/updates.py's `discard` is the stricter sibling
for packages in incoming/, which must not be read again. Blocking: the event loop calls it
through `asyncio.to_thread`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger()

# The entries named in the event; the count says how many failed in all.
_SHOWN = 5


def remove_tree(directory: Path, what: str) -> bool:
    """Delete `directory` and everything under it, as far as possible; True if nothing is
    left. `what` says what the directory was, for the operator who reads the log."""
    failures: list[str] = []

    def failed(path: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return  # gone already (or never there): nothing left to remove
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if f"{path}: {reason}" not in failures:  # a file where a directory was: two calls fail
            failures.append(f"{path}: {reason}")

    if sys.version_info >= (3, 12):
        shutil.rmtree(directory, onexc=lambda _function, path, exc: failed(path, exc))
    else:
        def on_error(_function: Any, path: str, excinfo: Any) -> None:
            failed(path, excinfo[1])

        shutil.rmtree(directory, onerror=on_error)
    if not failures:
        return True
    log.error("ota_directory_not_removed", path=str(directory), what=what,
              failures=len(failures), errors=failures[:_SHOWN], agent_uid=os.geteuid())
    return False
