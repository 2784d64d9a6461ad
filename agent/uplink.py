"""Uplink: outbox rows to the cloud broker with QoS 1; a row is retired only after its PUBACK.

Owns the publishing side of the cloud broker. Rows go out in outbox order, a window at a time;
each row keeps its stable `id`, so a row resent after a lost PUBACK or a crash is a duplicate the
receiver drops, never a loss. A broken link is reconnected with capped, jittered backoff, always
with a fresh client. It also owns the retained <prefix>/<device_id>/status topic: a birth message
on connect, a refresh every `service.status_interval_s`, a last will "offline".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent import mqtt
from agent.config import Settings
from agent.liveness import Liveness
from agent.retry import Backoff, OutageLog
from agent.store import Store
from agent.waits import first_of, wait_or_timeout, wait_or_timeout_any

log = structlog.get_logger()


class Uplink:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        # status(): the JSON summary behind the retained <prefix>/<device_id>/status topic.
        self._status = status
        self._status_topic = (
            f"{settings.cloud_broker.topic_prefix}/{settings.agent.device_id}/status"
        )
        self._status_interval_s = settings.service.status_interval_s
        self._device_id = settings.agent.device_id
        self._broker = settings.cloud_broker
        self._store = store
        self._client_id = self._broker.client_id or f"edge-agent-{settings.agent.device_id}-out"
        self.connected = False
        self.delivered = 0
        self.last_progress = time.monotonic()
        self.liveness = Liveness("uplink")
        self.connects = 0
        self._status_due = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set and the outbox is empty, or until cancelled."""
        backoff = Backoff(self._broker.reconnect_min_s, self._broker.reconnect_max_s)
        outage = OutageLog("uplink_link")
        while True:
            self.liveness.idle("connecting to the cloud broker")
            try:
                async with mqtt.connect(
                    self._broker,
                    client_id=self._client_id,
                    persistent_session=False,
                    max_inflight=self._broker.inflight_window,
                    will=self._will(),
                    name="cloud_broker",
                ) as link:
                    self.connected = True
                    self.connects += 1
                    outage.recovered()
                    backoff.reset()
                    log.info("uplink_connected",
                             broker=f"{self._broker.host}:{self._broker.port}")
                    await self._publish_status(link, "online")
                    await self._pump(link, stop)
                    await self._publish_status(link, "offline")
                    return
            except mqtt.LinkDown as exc:
                outage.failed(exc)
            finally:
                self.connected = False
            if stop.is_set():
                log.info("uplink_stopped_offline")
                return
            self.liveness.idle("cloud link down")
            await wait_or_timeout(stop, backoff.next_delay())

    def _will(self) -> tuple[str, bytes] | None:
        if self._status is None:
            return None
        body = {"device_id": self._device_id, "state": "offline", "reason": "connection lost"}
        return self._status_topic, json.dumps(body).encode()

    async def _publish_status(self, link: mqtt.Link, state: str) -> None:
        """The retained status: a birth message on connect, a refresh every status interval,
        "offline" on a graceful stop (a clean disconnect does not fire the will)."""
        if self._status is None:
            return
        body = {"device_id": self._device_id, "state": state, "at": time.time(),
                **self._status()}
        await link.publish(self._status_topic, json.dumps(body).encode(),
                           timeout_s=self._broker.publish_timeout_s, retain=True)
        self._status_due = time.monotonic() + self._status_interval_s

    async def _pump(self, link: mqtt.Link, stop: asyncio.Event) -> None:
        timeout_s = self._broker.publish_timeout_s
        while True:
            if self._status is not None and time.monotonic() >= self._status_due:
                self.liveness.busy()
                await self._publish_status(link, "online")
            self._store.outbox_changed.clear()
            rows = await self._store.pending_outbox(self._broker.inflight_window)
            if not rows:
                if stop.is_set():
                    return
                self.liveness.idle("waiting for results")
                if self._status is None:
                    await first_of(self._store.outbox_changed, stop)
                else:
                    await wait_or_timeout_any(
                        (self._store.outbox_changed, stop),
                        max(0.0, self._status_due - time.monotonic()),
                    )
                continue
            self.liveness.busy()
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

