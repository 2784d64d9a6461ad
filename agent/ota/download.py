"""Model downloads over HTTP(S): the only module that imports httpx for downloads.

agent/inference/cloud.py also imports httpx, for chat completions with the cloud model. The two
uses share nothing (one streams a file to disk with Range resumes, the other posts JSON under a
breaker), so each keeps its own client; putting both behind one module would have meant editing
cloud.py, which another branch owns, for no shared code. Library errors leave this module as
`DownloadCut` (transient: resume) or `DownloadRefused` (permanent: give up).

`fetch` owns the guarantees of one download into a file: never more than the declared size
(the stream is abandoned as soon as size+1 bytes have arrived), resumed with `Range: bytes=N-`
after a cut (a 206 must carry the matching Content-Range; a 200 restarts from 0), bounded by a
connect/read timeout, sha256-checked, fsynced, with progress logged at most once a second or
every 10%. Writes, the final fsync and the hash run in threads, off the event loop. It knows
nothing about manifests, packages or MQTT (agent/ota/remote.py does).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx
import structlog

from agent.base.digest import sha256_file
from agent.base.errors import PermanentError, TransientError

log = structlog.get_logger()

CHUNK_BYTES = 256 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DownloadCut(TransientError):
    """The transfer broke off (reset, timeout, early close, 5xx); resume with Range."""


class DownloadRefused(PermanentError):
    """The download can never succeed as asked: too big, wrong hash, or a 4xx."""


@dataclass(frozen=True, slots=True)
class Fetched:
    size: int
    connections: int
    resumed_from: list[int]
    seconds: float

    @property
    def rate_bytes_s(self) -> float:
        return self.size / self.seconds if self.seconds > 0 else 0.0


class _Progress:
    """Logs `model_download_progress` at most once a second or every 10% of the size."""

    def __init__(self, url: str, size: int) -> None:
        self._url, self._size = url, size
        self._started = time.monotonic()
        self._last_at = self._started
        self._last_tenth = -1
        self._last_have = -1

    def update(self, have: int, *, force: bool = False) -> None:
        now = time.monotonic()
        tenth = have * 10 // self._size
        if have == self._last_have or (
                not force and now - self._last_at < 1.0 and tenth == self._last_tenth):
            return
        self._last_at, self._last_tenth, self._last_have = now, tenth, have
        elapsed = now - self._started
        log.info("model_download_progress", url=self._url, bytes=have, size=self._size,
                 percent=round(100 * have / self._size, 1),
                 rate_bytes_s=round(have / elapsed) if elapsed > 0 else None)


def _open_partial(path: Path) -> tuple[BinaryIO, int]:
    handle = path.open("ab")
    return handle, handle.tell()


def _finish(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def _restart(handle: BinaryIO) -> None:
    handle.seek(0)
    handle.truncate()


async def _one_connection(client: httpx.AsyncClient, url: str, handle: BinaryIO, have: int,
                          size: int, progress: _Progress) -> int:
    """Fetch from `have` on; return the bytes now in the file. DownloadCut if cut short."""
    # identity: the declared size and sha256 are of the bytes on the wire, never decoded ones.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    async with client.stream("GET", url, headers=headers) as response:
        status = response.status_code
        if status == 206 and have:
            match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            if match is None or int(match[1]) != have:
                raise DownloadCut(f"{url}: 206 with Content-Range "
                                  f"{response.headers.get('content-range')!r}, asked from {have}")
            if match[3] != "*" and int(match[3]) != size:
                raise DownloadRefused(f"{url}: the server's file has {match[3]} bytes, "
                                      f"the manifest says {size}")
        elif status == 200:
            if have:
                log.info("model_download_restarted", url=url, discarded_bytes=have,
                         reason="the server ignored the Range request (200)")
                await asyncio.to_thread(_restart, handle)
                have = 0
        elif status >= 500 or status in (408, 429):
            raise DownloadCut(f"{url}: HTTP {status}")
        else:
            raise DownloadRefused(f"{url}: HTTP {status}")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and have + int(declared) > size:
            raise DownloadRefused(f"{url}: the server announces {have + int(declared)} bytes, "
                                  f"the manifest says {size}")
        async for chunk in response.aiter_raw(CHUNK_BYTES):
            have += len(chunk)
            if have > size:
                raise DownloadRefused(f"{url}: more than the declared {size} bytes arrived; "
                                      "abandoned the download")
            await asyncio.to_thread(handle.write, chunk)
            progress.update(have)
    return have


async def fetch(url: str, destination: Path, *, size: int, sha256: str, timeout_s: float,
                attempts: int, retry_pause_s: float = 1.0) -> Fetched:
    """Download `url` into `destination`, resuming whatever a previous run left there.

    Returns once the file has exactly `size` bytes with the right sha256 and is fsynced.
    DownloadCut after `attempts` cut connections (the partial file stays, to resume later);
    DownloadRefused (the partial file is deleted) when it can never succeed.
    """
    started = time.monotonic()
    progress = _Progress(url, size)
    handle, have = await asyncio.to_thread(_open_partial, destination)
    resumed_from: list[int] = []
    connections = 0
    try:
        if have > size:
            await asyncio.to_thread(_restart, handle)
            have = 0
        timeout = httpx.Timeout(timeout_s)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client:
            while have < size:
                if connections >= attempts:
                    raise DownloadCut(f"{url}: {connections} connection(s) cut; "
                                      f"{have} of {size} bytes kept to resume")
                if have:
                    resumed_from.append(have)
                connections += 1
                try:
                    have = await _one_connection(client, url, handle, have, size, progress)
                except (httpx.TransportError, DownloadCut) as exc:
                    have = await asyncio.to_thread(handle.tell)
                    log.warning("model_download_cut", url=url, bytes=have, size=size,
                                error=str(exc) or type(exc).__name__,
                                error_type=type(exc).__name__, connection=connections)
                    await asyncio.sleep(retry_pause_s)
                    continue
                except httpx.HTTPError as exc:
                    raise DownloadRefused(f"{url}: {type(exc).__name__}: {exc}") from exc
                if have < size:
                    log.warning("model_download_cut", url=url, bytes=have, size=size,
                                error="the server ended the body early", connection=connections)
                    await asyncio.sleep(retry_pause_s)
        await asyncio.to_thread(_finish, handle)
    except DownloadRefused:
        await asyncio.to_thread(handle.close)
        await asyncio.to_thread(destination.unlink, True)
        raise
    except BaseException:
        await asyncio.to_thread(_finish, handle)  # keep what arrived for the resume
        raise
    progress.update(have, force=True)
    actual = await asyncio.to_thread(sha256_file, destination)
    if actual != sha256:
        await asyncio.to_thread(destination.unlink, True)
        raise DownloadRefused(f"{url}: sha256 {actual} does not match the manifest's {sha256}")
    return Fetched(size, connections, resumed_from, time.monotonic() - started)
