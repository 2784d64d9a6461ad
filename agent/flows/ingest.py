"""Ingest: sensor readings from the local broker into the inbox, acked only after commit.

Owns the subscription side of the local broker. It connects with a fixed client id and a
persistent session (clean_session=0), resubscribes on every connect, classifies each message
(a reading for a route, or a dead letter with its reason), commits a whole batch in one
transaction and only then sends the PUBACKs. A crash before the commit means the broker still
holds the messages and redelivers them; a crash after it means a redelivery that the inbox drops
by id. Poison input is acked with its dead letter so it cannot loop.

A CONNACK without a session, after a first connect or at a start with a store that has taken
readings before, means the broker lost the persistent session, and with it the readings
published meanwhile: that is logged (`local_session_lost`) and counted. A retained message
comes again on every subscribe: on a route with `retained = "skip_answered"` (the default) it
is acked without inference when it is the last reading already taken on its topic (the store
keeps that id per topic, in the ingest's transaction).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import structlog

from agent.base.errors import OutboxFull, StoreFull, StoreUnavailable
from agent.base.liveness import Liveness
from agent.base.records import (
    DeadLetter,
    Delivery,
    NewOutboxRow,
    Reading,
    payload_id,
    topic_digest,
)
from agent.base.retry import Backoff, OutageEvents, OutageLog
from agent.base.validation import schema_violation
from agent.base.waits import wait_or_timeout
from agent.config.settings import Route, Settings
from agent.routing import payload
from agent.routing.outbound import Topics, dead_letter_row
from agent.routing.shedding import TopicLimiter
from agent.routing.topics import route_for, subscriptions
from agent.store.writer import Store
from agent.transport import mqtt

LINK_EVENTS = OutageEvents("ingest_link_failed", "ingest_link_failing", "ingest_link_recovered")

log = structlog.get_logger()

# While the store refuses input: the shortest and the longest pause between two looks at it.
PAUSED_RECHECK_MIN_S = 0.5
PAUSED_RECHECK_MAX_S = 30.0
# Topics whose route and id prefix ingest remembers (a gateway has tens to thousands of sensor
# topics; a flood of made-up topic names only makes the table start over).
TOPICS_KEPT = 10_000


class IngestObserver(Protocol):
    """What ingest reports as it happens (agent/service/metrics.py implements it)."""

    def session_lost(self) -> None: ...


class Ingest:
    def __init__(self, settings: Settings, store: Store, topics: Topics,
                 observer: IngestObserver | None = None) -> None:
        self._settings = settings
        self._observer = observer
        self._broker = settings.local_broker
        self._store = store
        self._topics = topics
        self._client_id = self._broker.client_id or f"edge-agent-{settings.agent.device_id}-in"
        self.subscribed = asyncio.Event()
        self.liveness = Liveness("ingest")
        self.connects = 0
        self._link: mqtt.Link | None = None
        # Filters dropped by a reload while the link was down: the persistent session still
        # holds them until they are unsubscribed on the next connect.
        self._stale_filters: set[str] = set()
        self._limiter = _limiter(settings)
        self._topics_seen: dict[str, tuple[Route | None, Any]] = {}
        self.shed = 0
        # Connects on which the local broker had lost the agent's persistent session.
        self.sessions_lost = 0
        # Retained messages acked without inference: already answered.
        self.retained_skipped = 0
        # Why input is not being acked right now (store or outbox full), or None.
        self.paused_reason: str | None = None

    async def run(self) -> None:
        """Receive until cancelled; reconnect with capped, jittered backoff after any failure."""
        backoff = Backoff(self._broker.reconnect_min_s, self._broker.reconnect_max_s)
        outage = OutageLog(LINK_EVENTS)
        while True:
            self.liveness.idle("connecting to the local broker")
            try:
                async with mqtt.connect(
                    self._broker,
                    client_id=self._client_id,
                    persistent_session=True,
                    manual_ack=True,
                    name="local_broker",
                ) as link:
                    if self._stale_filters:
                        await link.unsubscribe(sorted(self._stale_filters))
                        self._stale_filters.clear()
                    await link.subscribe(subscriptions(self._settings.routes))
                    self._link = link
                    outage.recovered()
                    if self.paused_reason is None:
                        # While the store is full, retries stay paced by the backoff: the
                        # broker redelivers the whole unacked window on every connect.
                        backoff.reset()
                    log.info("ingest_subscribed", broker=f"{self._broker.host}:{self._broker.port}",
                             client_id=self._client_id, session_present=link.session_present)
                    await self._check_session(link)
                    self.connects += 1
                    self.subscribed.set()
                    await link.guard(self._receive(link))
            except mqtt.LinkDown as exc:
                outage.failed(exc)
            except StoreUnavailable as exc:
                # A busy or failing disk is not a full one: waiting for room would return at
                # once and reconnect in a tight loop. Paused, so the link's backoff grows.
                outage.failed(exc)
                self.paused_reason = str(exc)
            except StoreFull as exc:
                # Unacked messages stay with the broker; reconnecting makes it redeliver them.
                if self.paused_reason is None:
                    log.error("ingest_paused", reason=str(exc),
                              outbox_bound=isinstance(exc, OutboxFull))
                self.paused_reason = str(exc)
                self._link = None
                self.subscribed.clear()
                await self._wait_for_room()
                continue
            self._link = None
            self.subscribed.clear()
            self.liveness.idle("local broker link down")
            await asyncio.sleep(backoff.next_delay())

    async def _wait_for_room(self) -> None:
        """While the store refuses input, stay off the local broker, which keeps the unacked
        readings, and ask the store again after a growing pause (cut short when a delivery or
        an expiry frees space). Each reconnect makes the broker redeliver its whole unacked
        window, so reconnecting on the link's backoff while full was churn: 133 reconnects in
        2 minutes, each a batch refused again."""
        pause = Backoff(PAUSED_RECHECK_MIN_S, PAUSED_RECHECK_MAX_S)
        while True:
            self.liveness.idle("store full: waiting for room")
            self._store.space_freed.clear()
            refusal = await self._store.input_refusal()
            if refusal is None:
                return
            self.paused_reason = str(refusal)
            await wait_or_timeout(self._store.space_freed, pause.next_delay())
            # Deliveries free space many times a second while a backlog drains: each one
            # need not cost a look at the filesystem.
            await asyncio.sleep(PAUSED_RECHECK_MIN_S)

    async def apply(self, settings: Settings) -> None:
        """Take reloaded routes and limits; change the live subscriptions to match."""
        before = subscriptions(self._settings.routes)
        after = subscriptions(settings.routes)
        self._settings = settings
        self._broker = settings.local_broker
        self._limiter = _limiter(settings)
        self._topics_seen.clear()
        removed = [f for f in before if f not in after]
        added = [f for f in after if f not in before]
        link = self._link
        if link is None:
            self._stale_filters.update(removed)
            return
        if removed:
            await link.unsubscribe(removed)
        if added:
            await link.subscribe(added)

    async def _check_session(self, link: mqtt.Link) -> None:
        """A CONNACK without a session, once this agent has had one (a connect earlier in this
        run, or readings taken into the store by an earlier run), means the local broker lost
        it: readings published while the agent was away are gone."""
        if link.session_present:
            return
        if self.connects == 0 and not await self._store.took_readings():
            return  # a new store: the first session starts now
        self.sessions_lost += 1
        log.warning(
            "local_session_lost",
            broker=f"{self._broker.host}:{self._broker.port}", client_id=self._client_id,
            sessions_lost=self.sessions_lost, at_start=self.connects == 0,
            meaning="the local broker kept no session for the agent: readings published while "
            "the agent was disconnected were not queued and are lost; the broker must persist "
            "sessions across its restarts, not expire them and not cap their queue "
            "(see README, Guarantees)")
        if self._observer is not None:
            self._observer.session_lost()

    async def _receive(self, link: mqtt.Link) -> None:
        while True:
            self.liveness.idle("waiting for input")
            batch = await link.next_batch(
                self._broker.batch_max_messages, self._broker.batch_wait_ms / 1000
            )
            self.liveness.busy()
            await self._commit(link, batch, await self._answered(batch))
            if self.paused_reason is not None:
                log.info("ingest_resumed", was=self.paused_reason)
                self.paused_reason = None

    async def _commit(self, link: mqtt.Link, batch: list[Delivery],
                      answered: list[bool]) -> None:
        """Commit a batch, then ack it. If the store is too full for the whole batch, commit
        and ack it in halves, oldest first, so a nearly full store still takes what fits
        (the broker redelivers the whole unacked window at once after a reconnect, which may
        never fit in one transaction). StoreFull escapes only for a single message.
        `answered[i]` marks a retained message answered already: acked, not committed."""
        take = [message for message, done in zip(batch, answered, strict=True) if not done]
        readings, dead = self.classify(take, time.time())
        if not readings and not dead:  # only retained readings already answered: nothing to
            link.ack_all(batch)        # commit, so a full store need not refuse them
            return
        try:
            outcome = await self._store.ingest(readings, dead)
        except StoreFull as exc:
            if len(batch) == 1 or isinstance(exc, StoreUnavailable):
                raise  # halves cannot fit better into a store that is not full but failing
            half = len(batch) // 2
            await self._commit(link, batch[:half], answered[:half])
            await self._commit(link, batch[half:], answered[half:])
            return
        # MQTT 3.1.1 4.6: PUBACKs go out in the order the PUBLISH packets arrived.
        link.ack_all(batch)
        log.debug("ingest_batch_committed", messages=len(batch), accepted=outcome.accepted,
                  duplicates=outcome.duplicates, dead_lettered=outcome.dead_lettered)

    async def _answered(self, batch: list[Delivery]) -> list[bool]:
        """For each message, whether it is a retained message already answered: on a route
        that skips them, one whose id is the last one taken on its topic. Asked once per
        batch; the skipped ones are still acked, in order, with the rest of the batch."""
        retained: dict[int, str] = {}
        for index, message in enumerate(batch):
            if not message.retain:
                continue
            route, topic_hash = self._topic(message.topic)
            if route is not None and route.retained == "skip_answered":
                retained[index] = payload_id(topic_hash, message.payload)
        if not retained:
            return [False] * len(batch)
        last = await self._store.last_readings([batch[i].topic for i in retained])
        answered = {i for i, rid in retained.items() if last.get(batch[i].topic) == rid}
        if answered:
            self.retained_skipped += len(answered)
            log.info("retained_readings_skipped", skipped=len(answered),
                     skipped_total=self.retained_skipped,
                     why="retained readings the agent answered already (route retained = "
                     "skip_answered)")
        return [i in answered for i in range(len(batch))]

    def classify(
        self, batch: list[Delivery], received_at: float
    ) -> tuple[list[Reading], list[tuple[DeadLetter, NewOutboxRow]]]:
        """Split a batch into readings for a route and dead letters with their reasons."""
        readings: list[Reading] = []
        dead: list[tuple[DeadLetter, NewOutboxRow]] = []
        for message in batch:
            route, topic_hash = self._topic(message.topic)
            rid = payload_id(topic_hash, message.payload)
            reason: str | None = None
            if route is None:
                reason = "no route takes this topic"
            elif self._limiter is not None and not self._limiter.allow(message.topic):
                reason = (f"shed: topic over {self._limiter.rate_per_s:g} readings/s "
                          "(local_broker.max_readings_per_s_per_topic)")
                self.shed += 1
                if self.shed == 1 or self.shed % 1000 == 0:
                    log.warning("ingest_shedding", topic=message.topic, shed_total=self.shed)
            else:
                try:
                    reason = self._refusal(message, route)
                except Exception as exc:  # a check nobody expected to fail: this message only
                    log.error("ingest_check_failed", topic=message.topic, id=rid,
                              error=f"{type(exc).__name__}: {exc}", exc_info=exc)
                    reason = f"ingest could not check the payload: {type(exc).__name__}: {exc}"
            if reason is None and route is not None:
                readings.append(Reading(rid, message.topic, message.payload, received_at,
                                        route.name, route.priority))
            else:
                kept = message.payload[: self._broker.max_payload_bytes]
                letter = DeadLetter(rid, message.topic, kept, reason or "", received_at)
                dead.append((letter, dead_letter_row(self._topics, letter)))
        return readings, dead

    def _topic(self, topic: str) -> tuple[Route | None, Any]:
        """The route that takes `topic` and the hash of its reading ids' prefix, worked out once
        per topic (until a reload; the whole table is dropped if it grows past TOPICS_KEPT)."""
        seen = self._topics_seen.get(topic)
        if seen is None:
            if len(self._topics_seen) >= TOPICS_KEPT:
                self._topics_seen.clear()
            seen = (route_for(self._settings.routes, topic),
                    topic_digest(self._settings.agent.device_id, topic))
            self._topics_seen[topic] = seen
        return seen

    def _refusal(self, message: Delivery, route: Route) -> str | None:
        """Why the payload cannot be a reading of `route`, or None."""
        try:
            value = payload.parse(message.payload, max_bytes=self._broker.max_payload_bytes,
                                  max_depth=self._broker.max_json_depth)
        except payload.PayloadRejected as exc:
            return str(exc)
        if route.input_schema is not None:
            problem = schema_violation(value, route.input_schema)
            if problem is not None:
                return f"payload fails the route's input schema {problem}"
        return None


def _limiter(settings: Settings) -> TopicLimiter | None:
    broker = settings.local_broker
    if broker.max_readings_per_s_per_topic is None:
        return None
    return TopicLimiter(broker.max_readings_per_s_per_topic, broker.burst_readings_per_topic)
