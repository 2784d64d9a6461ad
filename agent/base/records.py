"""Records that cross module boundaries: frozen, slotted dataclasses and how their ids are derived.

Owns the idempotency key. It must stay stable: the same source message always yields the same id,
across restarts and redeliveries, so the cloud side can drop duplicates by `id`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any


def reading_id(device_id: str, topic: str, payload: bytes) -> str:
    """Stable id of a sensor message: the same (device, topic, payload) always gives the same id.

    A redelivered MQTT message is byte-identical, so it maps to the same id and is deduplicated.
    Sensors should put a timestamp or sequence number in the payload: two byte-identical
    readings on one topic are, by design, the same reading.
    """
    return payload_id(topic_digest(device_id, topic), payload)


def topic_digest(device_id: str, topic: str) -> Any:
    """The hash of a reading id's (device, topic) part: ingest keeps one per topic and copies
    it for each payload (`payload_id`), instead of hashing the same prefix for every reading."""
    digest = hashlib.sha256()
    for part in (device_id.encode(), topic.encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest


def payload_id(topic_hash: Any, payload: bytes) -> str:
    """`reading_id` of `payload` on the topic whose `topic_digest` is `topic_hash`."""
    digest = topic_hash.copy()
    digest.update(len(payload).to_bytes(8, "big"))
    digest.update(payload)
    return str(digest.hexdigest()[:32])


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message as the local broker delivered it, before it is classified. `retain` is set
    only on a retained message the broker sent because of a (re)subscription, never on a live
    one (MQTT 3.1.1 section 3.3.1.3)."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Reading:
    """A validated sensor reading waiting in the inbox for inference."""

    id: str
    topic: str
    payload: bytes
    received_at: float
    route: str
    priority: int
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An input the agent refused, with the reason, kept locally and reported to the cloud."""

    id: str
    topic: str
    payload: bytes
    reason: str
    received_at: float


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A record waiting for the cloud broker's PUBACK."""

    seq: int
    id: str
    topic: str
    payload: bytes
    kind: str = "result"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Provenance of the model that produced a result."""

    name: str
    version: str
    sha256: str
    path: str


@dataclass(frozen=True, slots=True)
class Generation:
    """How to generate one answer, the same for the local worker, a served model and the
    cloud model. `prefix_key` names the request's fixed prompt prefix (a route's prompt) for
    the worker's prefix cache; the cloud ignores it."""

    max_tokens: int
    temperature: float
    seed: int
    schema: dict[str, Any] | None = None
    prefix_key: str | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """What the inference worker returned for one request."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_ms: float
    reused_tokens: int = 0  # prompt tokens found already evaluated (prefix cache)


JSONValue = Any


@dataclass(frozen=True, slots=True)
class NewOutboxRow:
    """A record to be added to the outbox; `kind` and `id` together are unique."""

    id: str
    kind: str
    topic: str
    payload: bytes
    priority: int
    # The route that produced the row; drops are counted per route (per kind when empty).
    route: str = ""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A snapshot of the store for status lines, metrics and the operator CLI."""

    inbox: int
    inbox_bytes: int
    outbox: int
    outbox_bytes: int
    dead_letter: int
    delivered: int
    oldest_undelivered_s: float | None


@dataclass(frozen=True, slots=True)
class Answer:
    """What the executors made of one prompt (a reading's or a window's); `error` set means the
    answer failed its schema and `raw` holds the text."""

    output: Any
    error: str | None
    completion: Completion | None
    model: ModelInfo
    raw: str | None
    executor: str
    executor_reason: str | None
