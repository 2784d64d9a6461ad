"""Uplink: outbox rows to the cloud broker with QoS 1; a row is retired only after its PUBACK.

Owns the publishing side of the cloud broker. Rows go out in outbox order, a window at a time;
each row keeps its stable `id`, so a row resent after a lost PUBACK or a crash is a duplicate the
receiver drops, never a loss. A broken link is reconnected with capped, jittered backoff, always
with a fresh client.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from agent import mqtt
from agent.config import Settings
from agent.messages import RETAINED_KIND
from agent.retry import Backoff, OutageLog
from agent.store import Store
from agent.waits import first_of, wait_or_timeout

log = structlog.get_logger()


class Uplink:
    def __init__(self, settings: Settings, store: Store) -> None:
        self._broker = settings.cloud_broker
        self._store = store
        self._client_id = self._broker.client_id or f"edge-agent-{settings.agent.device_id}-out"
        self.connected = False
        self.delivered = 0
        self.last_progress = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set and the outbox is empty, or until cancelled."""
        backoff = Backoff(self._broker.reconnect_min_s, self._broker.reconnect_max_s)
        outage = OutageLog("uplink_link")
        while True:
            try:
                async with mqtt.connect(
                    self._broker,
                    client_id=self._client_id,
                    persistent_session=False,
                    max_inflight=self._broker.inflight_window,
                ) as link:
                    self.connected = True
                    outage.recovered()
                    backoff.reset()
                    log.info("uplink_connected",
                             broker=f"{self._broker.host}:{self._broker.port}")
                    await self._pump(link, stop)
                    return
            except mqtt.LinkDown as exc:
                outage.failed(exc)
            finally:
                self.connected = False
            if stop.is_set():
                log.info("uplink_stopped_offline")
                return
            await wait_or_timeout(stop, backoff.next_delay())

    async def _pump(self, link: mqtt.Link, stop: asyncio.Event) -> None:
        timeout_s = self._broker.publish_timeout_s
        while True:
            self._store.outbox_changed.clear()
            rows = await self._store.pending_outbox(self._broker.inflight_window)
            if not rows:
                if stop.is_set():
                    return
                await first_of(self._store.outbox_changed, stop)
                continue
            # All publishes of a window are in flight together; paho sends them in this order.
            outcomes = await asyncio.gather(
                *(link.publish(row.topic, row.payload, timeout_s=timeout_s,
                               retain=row.kind == RETAINED_KIND) for row in rows),
                return_exceptions=True,
            )
            acked = [row.seq for row, outcome in zip(rows, outcomes, strict=True)
                     if outcome is None]
            if acked:
                await self._store.mark_delivered(acked)
                self.delivered += len(acked)
                self.last_progress = time.monotonic()
                log.debug("outbox_batch_delivered", rows=len(acked))
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome

