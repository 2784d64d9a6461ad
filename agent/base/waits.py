"""Waiting for whichever of several asyncio events is set first. Pure asyncio, no I/O."""

from __future__ import annotations

import asyncio
import contextlib


async def first_of(*events: asyncio.Event) -> None:
    """Return as soon as any of the events is set; the helper waits are cancelled on the way out."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def wait_or_timeout(event: asyncio.Event, timeout_s: float) -> None:
    """Sleep for `timeout_s`, or less if the event is set first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)


async def wait_or_timeout_any(events: tuple[asyncio.Event, ...], timeout_s: float) -> None:
    """Return when any of the events is set, or after `timeout_s`."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(first_of(*events), timeout_s)
