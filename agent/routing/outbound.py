"""What the agent says to the cloud: topic names and the JSON bodies of results and dead letters.

Pure logic. The model never chooses a topic: every topic is built here from the configuration.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from agent.base.records import Answer, DeadLetter, NewOutboxRow, Reading

# A dead letter's report carries at most this much of the refused payload (base64).
REPORT_PAYLOAD_BYTES = 1024
DEAD_LETTER_PRIORITY = 9
# Above every route: a drop report is never itself dropped (the store exempts kind "drops").
DROPS_PRIORITY = 10


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str
    device_id: str

    def result(self, route: str) -> str:
        return f"{self.prefix}/{self.device_id}/results/{route}"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}/{self.device_id}/deadletter"

    @property
    def drops(self) -> str:
        return f"{self.prefix}/{self.device_id}/drops"

    @property
    def model_events(self) -> str:
        return f"{self.prefix}/{self.device_id}/events/model"

    @property
    def model_status(self) -> str:
        return f"{self.prefix}/{self.device_id}/status/model"

    @property
    def model_command(self) -> str:
        return f"{self.prefix}/{self.device_id}/cmd/model"


def encode(body: dict[str, Any]) -> bytes:
    """A record's JSON bytes: compact, UTF-8, and no NaN or Infinity (strict JSON)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def outcome_fields(answer: Answer, prompt_version: str) -> dict[str, Any]:
    """What every result says about its answer, whether it covers one reading or a window:
    status, output, provenance (model, executor, prompt version), latency and tokens."""
    completion, model = answer.completion, answer.model
    fields: dict[str, Any] = {
        "status": "ok" if answer.error is None else "failed",
        "output": answer.output if answer.error is None else None,
        "model": {"name": model.name, "version": model.version, "sha256": model.sha256},
        "executor": answer.executor,
        "prompt_version": prompt_version,
        "latency_ms": round(completion.latency_ms, 1) if completion else None,
        "tokens": {"prompt": completion.prompt_tokens if completion else 0,
                   "completion": completion.completion_tokens if completion else 0},
    }
    if answer.error is not None:
        fields["error"] = answer.error
    if answer.raw is not None:
        fields["raw"] = answer.raw
    if answer.executor_reason is not None:
        fields["executor_reason"] = answer.executor_reason
    return fields


def result_row(topics: Topics, reading: Reading, source_payload: Any, answer: Answer,
               prompt_version: str) -> NewOutboxRow:
    """The outbox row of one result; `id` is the reading's id, so retries give the same id."""
    body: dict[str, Any] = {
        "id": reading.id,
        "device_id": topics.device_id,
        "route": reading.route,
        "source": {"topic": reading.topic, "received_at": reading.received_at,
                   "payload": source_payload},
        **outcome_fields(answer, prompt_version),
        "attempts": reading.attempts,
    }
    return NewOutboxRow(reading.id, "result", topics.result(reading.route), encode(body),
                        reading.priority, reading.route)


def dead_letter_row(topics: Topics, dead: DeadLetter) -> NewOutboxRow:
    """The report of a refused input: its id, topic, reason and the head of its payload."""
    head = dead.payload[:REPORT_PAYLOAD_BYTES]
    body = {
        "id": dead.id,
        "device_id": topics.device_id,
        # A reason may quote the input (an exception's text): keep it encodable as UTF-8.
        "reason": dead.reason.encode("utf-8", "backslashreplace").decode("utf-8"),
        "source": {
            "topic": dead.topic,
            "received_at": dead.received_at,
            "payload_bytes": len(dead.payload),
            "payload_head_b64": base64.b64encode(head).decode(),
        },
    }
    return NewOutboxRow(dead.id, "dead_letter", topics.dead_letter, encode(body),
                        DEAD_LETTER_PRIORITY)


def drops_row(topics: Topics, report: int, dropped: dict[str, int],
              dropped_total: dict[str, int]) -> NewOutboxRow:
    """The report of outbox rows dropped at the size bound: per route, since the last report and
    in total. `report` numbers the reports of this store, so a resent report keeps its id."""
    body = {
        "id": f"{topics.device_id}-drops-{report}",
        "device_id": topics.device_id,
        "report": report,
        "dropped": dropped,
        "dropped_total": dropped_total,
    }
    return NewOutboxRow(str(body["id"]), "drops", topics.drops, encode(body), DROPS_PRIORITY)


MODEL_EVENT_PRIORITY = 8
# Outbox rows of this kind are published with the MQTT retain flag (agent/flows/uplink.py).
RETAINED_KIND = "status"


def model_event_row(topics: Topics, event_id: str, step: str, body: dict[str, Any]) -> NewOutboxRow:
    """One step or outcome of a model update, for edge/<device_id>/events/model."""
    full = {"id": event_id, "device_id": topics.device_id, "step": step, **body}
    return NewOutboxRow(event_id, "model_event", topics.model_events, encode(full),
                        MODEL_EVENT_PRIORITY)


def model_status_row(topics: Topics, event_id: str, body: dict[str, Any]) -> NewOutboxRow:
    """The retained status naming the active model, for edge/<device_id>/status/model."""
    full = {"id": event_id, "device_id": topics.device_id, **body}
    return NewOutboxRow(event_id, RETAINED_KIND, topics.model_status, encode(full),
                        MODEL_EVENT_PRIORITY)
