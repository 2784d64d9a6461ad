"""What a SIGHUP may change in a running agent, and what needs a restart. Pure logic.

Reloadable: the routes, the pipeline's retry policy, and the local broker's input limits,
batching and load shedding. Everything else (identity, state directory, broker addresses, TLS,
client ids, the model, the cloud model, the service section) is fixed for the life of the
process: a change there is reported by key and takes effect at the next restart.
"""

from __future__ import annotations

from typing import Any

from agent.config.settings import Settings

LOCAL_BROKER_RELOADABLE = ("batch_max_messages", "batch_wait_ms", "max_payload_bytes",
                           "max_json_depth", "max_readings_per_s_per_topic",
                           "burst_readings_per_topic")
SECTIONS_RELOADABLE = ("routes", "pipeline")


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, child in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else str(key), child))
        return out
    return {prefix: value}


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """Dotted keys whose values differ (routes compare as a whole)."""
    before = _flatten("", old.model_dump(mode="json", exclude={"routes"}))
    after = _flatten("", new.model_dump(mode="json", exclude={"routes"}))
    keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if old.model_dump(mode="json")["routes"] != new.model_dump(mode="json")["routes"]:
        keys.insert(0, "routes")
    return keys


def is_reloadable(key: str) -> bool:
    section, _, rest = key.partition(".")
    if section in SECTIONS_RELOADABLE:
        return True
    return section == "local_broker" and rest in LOCAL_BROKER_RELOADABLE


def merge(old: Settings, new: Settings) -> Settings:
    """The running settings with the reloadable parts of `new` applied, the rest kept."""
    limits = {key: getattr(new.local_broker, key) for key in LOCAL_BROKER_RELOADABLE}
    return old.model_copy(update={
        "routes": new.routes,
        "pipeline": new.pipeline,
        "local_broker": old.local_broker.model_copy(update=limits),
    })
