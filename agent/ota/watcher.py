"""Watches incoming/ (and the OTA directory, for rollback requests): the only module that
imports watchdog.

watchdog calls back on its own thread; the only thing the callback does is hand the news to the
event loop with `loop.call_soon_threadsafe`. The debounce runs on the loop: the OTA flow is woken
only after `ota.watch_debounce_s` without any change, so a package that is still being copied
is not read half-written. It never reads a package itself.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agent.base.waits import first_of

log = structlog.get_logger()


class _Relay(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, changed: asyncio.Event) -> None:
        self._loop = loop
        self._changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads (our own, while verifying) are not changes
        self._loop.call_soon_threadsafe(self._changed.set)


class Watcher:
    """Sets `wake` once the watched directories have been quiet for `debounce_s`."""

    def __init__(self, incoming: Path, others: Sequence[Path], wake: asyncio.Event,
                 debounce_s: float) -> None:
        self._incoming = incoming
        self._others = list(others)
        self._wake = wake
        self._debounce_s = debounce_s

    async def run(self, stop: asyncio.Event) -> None:
        changed = asyncio.Event()
        relay = _Relay(asyncio.get_running_loop(), changed)
        # Only incoming/ recursively: files are written inside its package directories.
        observing = _Observing(relay, [(self._incoming, True),
                                       *((other, False) for other in self._others)])
        try:
            await asyncio.to_thread(observing.start)
            log.info("ota_watching", incoming=str(self._incoming))
            while not stop.is_set():
                await first_of(changed, stop)
                # Debounce: wait until a whole interval passes with no further change.
                while changed.is_set() and not stop.is_set():
                    changed.clear()
                    await asyncio.sleep(self._debounce_s)
                if not stop.is_set():
                    self._wake.set()
        finally:
            await asyncio.to_thread(observing.stop, 5.0)


class _Observing:
    """watchdog's Observer, started and stopped in threads: `Observer.start` creates the
    directories' inotify watches in the calling thread (a walk of incoming/), which must not
    run on the loop. The lock orders a stop that a cancel sends while the start still runs:
    the stop waits for it, or the start, coming second, does nothing."""

    def __init__(self, relay: _Relay, directories: list[tuple[Path, bool]]) -> None:
        self._relay = relay
        self._directories = directories
        self._observer = Observer()
        self._lock = threading.Lock()
        self._started = self._stopped = False

    def start(self) -> None:
        with self._lock:
            if self._stopped:
                return
            for directory, recursive in self._directories:
                directory.mkdir(parents=True, exist_ok=True)
                self._observer.schedule(self._relay, str(directory), recursive=recursive)
            self._observer.start()
            self._started = True

    def stop(self, timeout_s: float) -> None:
        with self._lock:
            self._stopped = True
            if not self._started:
                return
            self._observer.stop()
        self._observer.join(timeout_s)
