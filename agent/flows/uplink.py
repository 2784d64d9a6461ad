"""Uplink: outbox rows to the cloud broker with QoS 1; a row is retired only after its PUBACK.

Owns the publishing side of the cloud broker. Rows go out in outbox order, a window at a time;
each row keeps its stable `id`, so a row resent after a lost PUBACK or a crash is a duplicate the
receiver drops, never a loss. A broken link is reconnected with capped, jittered backoff, always
with a fresh client. It also owns the retained <prefix>/<device_id>/status topic: a birth message
on connect, a refresh every `service.status_interval_s`, a last will "offline".
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.base.errors import StoreFull
from agent.base.liveness import Liveness
from agent.base.retry import Backoff, OutageEvents, OutageLog, retry_while_full
from agent.base.waits import first_of, wait_or_timeout, wait_or_timeout_any
from agent.config.settings import Settings
from agent.routing.outbound import RETAINED_KIND, Topics, drops_row
from agent.store.writer import Store
from agent.transport import mqtt

LINK_EVENTS = OutageEvents("uplink_link_failed", "uplink_link_failing", "uplink_link_recovered")
STORE_EVENTS = OutageEvents("uplink_store_failed", "uplink_store_failing", "uplink_store_recovered")

log = structlog.get_logger()

HOUSEKEEPING_INTERVAL_S = 1.0


class Uplink:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        topics: Topics | None = None,
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
        self._drops_row = functools.partial(
            drops_row, topics or Topics(self._broker.topic_prefix, settings.agent.device_id)
        )
        self._client_id = self._broker.client_id or f"edge-agent-{settings.agent.device_id}-out"
        self._ttls = {route.name: route.ttl_s for route in settings.routes
                      if route.ttl_s is not None}
        self.connected = False
        self.delivered = 0
        self.liveness = Liveness("uplink")
        self.connects = 0
        self._status_due = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set and the outbox is empty, or until cancelled."""
        backoff = Backoff(self._broker.reconnect_min_s, self._broker.reconnect_max_s)
        outage = OutageLog(LINK_EVENTS)
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
                    self._status_due = 0.0  # the birth message goes out with the first rows
                    await link.guard(self._pump(link, stop))
                    await self._publish_status(link, "offline")
                    return
            except mqtt.LinkDown as exc:
                outage.failed(exc)
            except StoreFull as exc:
                # A write this connection needed was refused (retiring rows waits instead):
                # reconnect after the backoff; rows not yet retired are resent with their ids.
                outage.failed(exc, store_full=True)
            finally:
                self.connected = False
            if stop.is_set():
                log.info("uplink_stopped_offline")
                return
            self.liveness.idle("cloud link down")
            await self._expire()  # rows age during an outage: checked at every retry
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

    async def _report_drops(self) -> None:
        try:
            report = await self._store.report_drops(self._drops_row)
        except StoreFull as exc:  # the drops stay counted; reported once there is room
            log.warning("outbox_drops_report_failed", error=str(exc))
            return
        if report is not None:
            log.warning("outbox_drops_reported", id=report.id)

    async def _pump(self, link: mqtt.Link, stop: asyncio.Event) -> None:
        """Keep up to `inflight_window` rows in flight; commit PUBACKed rows in groups.

        Publishing never waits for a commit: the committer retires whatever was acked while
        its previous transaction ran, so one fsync covers many rows. A row is deleted only
        after its PUBACK; rows acked but not yet committed when the link breaks are sent again
        (duplicates bounded by the window), never lost.
        """
        window = _Window(self._broker.inflight_window)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._commit_acked(window), name="uplink-commit")
                tasks.create_task(self._watch_pubacks(window), name="uplink-puback-watch")
                await self._send_rows(link, tasks, window, stop)
                await window.idle.wait()
                window.finish()
        except BaseExceptionGroup as group:
            # A broken link or a full store ends this connection the same way: run() retries.
            known = [e for e in group.exceptions if isinstance(e, mqtt.LinkDown | StoreFull)]
            if len(known) == len(group.exceptions):
                raise known[0] from group
            raise
        finally:
            if window.acked:
                await self._retire(window.take())

    async def _send_rows(self, link: mqtt.Link, tasks: asyncio.TaskGroup, window: _Window,
                         stop: asyncio.Event) -> None:
        sent_up_to = 0
        draining = False  # the last fetch filled a whole window: a backlog is being drained
        housekeeping_due = 0.0
        while True:
            if self._status is not None and time.monotonic() >= self._status_due:
                # In flight beside the rows, never ahead of them: a status whose PUBACK is
                # slow must not hold results back (its timeout ends the connection like theirs).
                self._status_due = time.monotonic() + self._status_interval_s
                tasks.create_task(self._publish_status(link, "online"), name="uplink-status")
            self._store.outbox_changed.clear()
            # Rows dropped at the outbox bound are reported once the link is up (and again
            # whenever more were dropped); the report itself waits in the outbox like any row.
            # While a backlog drains, this runs once a second rather than for every window:
            # two more store round trips per window cost a quarter of the drain rate.
            now = time.monotonic()
            if not draining or now >= housekeeping_due:
                housekeeping_due = now + HOUSEKEEPING_INTERVAL_S
                await self._expire()
                await self._report_drops()
            rows = await self._store.pending_outbox(window.size, after_seq=sent_up_to)
            draining = len(rows) == window.size
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
            for row in rows:
                await window.slots.acquire()
                window.started(row.seq)
                # paho puts PUBLISH packets on the wire in this order: per-stream order holds.
                # Rows of the retained kind (the model status) keep the broker's last value.
                link.publish_nowait(row.topic, row.payload, retain=row.kind == RETAINED_KIND,
                                    on_puback=functools.partial(window.puback, row.seq))
                sent_up_to = row.seq

    async def _watch_pubacks(self, window: _Window) -> None:
        """End the connection (LinkDown) when a row has waited `publish_timeout_s` for its
        PUBACK: the broker is not taking rows, and a fresh connection resends them."""
        timeout_s = self._broker.publish_timeout_s
        while not window.done:
            oldest = window.oldest_sent_at()
            if oldest is not None and time.monotonic() - oldest > timeout_s:
                raise mqtt.LinkDown(f"no PUBACK within {timeout_s} s "
                                    f"({window.in_flight} rows in flight)")
            await wait_or_timeout(window.closed, min(1.0, timeout_s / 4))

    async def _commit_acked(self, window: _Window) -> None:
        while not (window.done and not window.acked):
            await window.ready.wait()
            window.ready.clear()
            if window.acked:
                await self._retire(window.take())

    async def _retire(self, seqs: list[int]) -> None:
        """Delete PUBACKed rows. While the store is full (it may spend the drain reserve for
        this, so only briefly), wait and commit the same rows again rather than end the
        connection: rows resent on a new one would meet the same full disk."""
        await retry_while_full(STORE_EVENTS, lambda: self._store.mark_delivered(seqs),
                               rows=len(seqs))
        self.delivered += len(seqs)
        self.liveness.progressed()
        log.debug("outbox_batch_delivered", rows=len(seqs))


class _Window:
    """The rows in flight on one connection, and the PUBACKed ones awaiting their commit."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots = asyncio.Semaphore(size)
        self.acked: list[int] = []
        self.ready = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.done = False
        self.closed = asyncio.Event()  # set with `done`, for waits
        self._sent_at: dict[int, float] = {}  # seq -> when published, oldest first

    @property
    def in_flight(self) -> int:
        return len(self._sent_at)

    def started(self, seq: int) -> None:
        self._sent_at[seq] = time.monotonic()
        self.idle.clear()

    def puback(self, seq: int) -> None:
        """The broker has the row: free its slot and queue it for the group commit."""
        del self._sent_at[seq]
        self.slots.release()
        if not self._sent_at:
            self.idle.set()
        self.acked.append(seq)
        self.ready.set()

    def oldest_sent_at(self) -> float | None:
        return next(iter(self._sent_at.values()), None)

    def take(self) -> list[int]:
        seqs, self.acked = self.acked, []
        return seqs

    def finish(self) -> None:
        """No more publishes on this connection: the committer retires the rest and returns."""
        self.done = True
        self.ready.set()
        self.closed.set()
