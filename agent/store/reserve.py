"""The drain's reserve: a preallocated file beside the store that input may never spend.

Owns `<db>-reserve`, a file of `drain_reserve_bytes` allocated on the filesystem (not sparse)
while there is room. When a write of the drain (a lease, a result, a delivered row's delete, an
expiry) fails because the filesystem is full, agent/store/writer.py's writer thread releases it
here, so that SQLite can fold its WAL into the database, truncate it and commit the write: without
it, a store filled during a cloud outage cannot even delete a delivered row (the WAL can
neither grow nor be checkpointed into a database file that cannot grow). The file is taken
again once the store has room for it beside the ingest reserve. Pure file handling, no SQLite;
runs only on agent/store/writer.py's writer thread.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def reserve_path(db: Path) -> Path:
    return db.with_name(db.name + "-reserve")


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still allocate on the filesystem of `directory`."""
    fs = os.statvfs(directory)
    return int(fs.f_bavail * fs.f_frsize)


class DrainReserve:
    """The preallocated file: `held` while it occupies its `size` bytes on the filesystem."""

    def __init__(self, db: Path, size: int) -> None:
        self.path = reserve_path(db)
        self.size = size
        self.held = False
        self.spent = False  # released by this process at least once

    def adopt(self) -> bool:
        """Hold the file an earlier run left, if it has the right size (at open)."""
        try:
            self.held = self.size > 0 and self.path.stat().st_size == self.size
        except FileNotFoundError:
            self.held = False
        return self.held

    def take(self) -> bool:
        """Allocate the whole file; False (and no file left behind) if the filesystem has no
        room for it."""
        if self.size == 0:
            return False
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                # posix_fallocate reserves the blocks (glibc writes them where the filesystem
                # cannot allocate): a sparse file would reserve nothing.
                os.posix_fallocate(fd, 0, self.size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            self.path.unlink(missing_ok=True)
            self.held = False
            return False
        self.held = True
        return True

    def release(self) -> bool:
        """Give the file's bytes back to the filesystem; False if it was not held."""
        if not self.held and not self.path.exists():
            return False
        self.path.unlink(missing_ok=True)
        self.held = False
        self.spent = True
        return True
