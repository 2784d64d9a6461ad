"""Uplink: outbox rows to the cloud broker with QoS 1; a row is retired only after its PUBACK.

Owns the publishing side of the cloud broker. Rows go out in outbox order, a window at a time;
each row keeps its stable `id`, so a row resent after a lost PUBACK or a crash is a duplicate the
receiver drops, never a loss. A broken link is reconnected with capped, jittered backoff, always
with a fresh client.
"""

from __future__ import annotations

import asyncio
import functools
import time

import structlog

from agent import mqtt
from agent.config import Settings
from agent.errors import StoreFull
from agent.messages import Topics, drops_row
from agent.retry import Backoff, OutageLog
from agent.store import Store
from agent.waits import first_of, wait_or_timeout

log = structlog.get_logger()


class Uplink:
    def __init__(self, settings: Settings, store: Store, topics: Topics | None = None) -> None:
        self._broker = settings.cloud_broker
        self._store = store
        self._drops_row = functools.partial(
            drops_row, topics or Topics(self._broker.topic_prefix, settings.agent.device_id)
        )
        self._client_id = self._broker.client_id or f"edge-agent-{settings.agent.device_id}-out"
        self._ttls = {route.name: route.ttl_s for route in settings.routes
                      if route.ttl_s is not None}
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
                    await link.guard(self._pump(link, stop))
                    return
            except mqtt.LinkDown as exc:
                outage.failed(exc)
            except StoreFull as exc:
                # Retiring delivered rows needs a little space too; they are resent (same ids).
                outage.failed(exc, store_full=True)
            finally:
                self.connected = False
            if stop.is_set():
                log.info("uplink_stopped_offline")
                return
            await self._expire()  # rows age during an outage: checked at every retry
            await wait_or_timeout(stop, backoff.next_delay())

    async def _expire(self) -> None:
        if not self._ttls:
            return
        try:
            expired = await self._store.expire(self._ttls)
        except StoreFull as exc:  # expiry only frees space; it is tried again next round
            log.warning("outbox_expiry_failed", error=str(exc))
            return
        if expired:
            log.warning("outbox_rows_expired", expired=expired)

    async def _pump(self, link: mqtt.Link, stop: asyncio.Event) -> None:
        timeout_s = self._broker.publish_timeout_s
        while True:
            self._store.outbox_changed.clear()
            # Rows dropped at the outbox bound are reported once the link is up (and again
            # whenever more were dropped); the report itself waits in the outbox like any row.
            await self._expire()
            report = await self._store.report_drops(self._drops_row)
            if report is not None:
                log.warning("outbox_drops_reported", id=report.id)
            rows = await self._store.pending_outbox(self._broker.inflight_window)
            if not rows:
                if stop.is_set():
                    return
                await first_of(self._store.outbox_changed, stop)
                continue
            # All publishes of a window are in flight together; paho sends them in this order.
            outcomes = await asyncio.gather(
                *(link.publish(row.topic, row.payload, timeout_s=timeout_s) for row in rows),
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

