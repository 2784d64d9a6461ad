"""One [[routes]] entry: which topics a route takes, the prompt and the JSON schemas of its
input and output, where its readings run (executor), how long its results live and how its
readings are windowed, with the checks among those keys.

Declarations only, like agent/config/sections.py: nothing here reads files or the environment, and
nothing runs at import time. Checks across routes (unique names, a cloud model for non-local
routes) belong to `Settings` in agent/config/settings.py, which re-exports `Route`; import it from
there.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from agent.base.validation import schema_problem
from agent.config.sections import Section


class Route(Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Route name; results go to <prefix>/<device_id>/results/<name>.",
    )
    topics: list[str] = Field(
        min_length=1, description="MQTT topic filters (+ and # wildcards) this route takes."
    )
    system_prompt: str = Field(
        default="You are an industrial monitoring assistant. Answer only with JSON.",
        description="The system message.",
    )
    instruction: str = Field(
        description="What the model must do with the reading, placed before the data block."
    )
    output_schema: dict[str, Any] | None = Field(
        default=None,
        description="JSON schema the output must satisfy; it becomes a llama.cpp grammar.",
    )
    input_schema: dict[str, Any] | None = Field(
        default=None,
        description="JSON schema a reading's payload must satisfy; one that does not is "
        "dead-lettered with the violation, before any inference.",
    )
    max_tokens: int = Field(default=64, ge=1, le=8192, description="Generation bound per answer.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="Sampling temperature.")
    output_attempts: int = Field(
        default=2,
        ge=1,
        le=10,
        description="Generations tried before an output that fails the schema is recorded as a "
        "failed result with its raw text.",
    )
    priority: int = Field(
        default=0, ge=0, le=9, description="Higher is leased first from the inbox."
    )
    retained: Literal["skip_answered", "infer"] = Field(
        default="skip_answered",
        description="Retained readings (Zigbee2MQTT, Tasmota and ESPHome publish retained) come "
        "again from the local broker on every subscribe. skip_answered acks one without "
        "inference when it is the last reading the agent already took on its topic; infer "
        "answers it again on every reconnect (a result with the same id each time, which "
        "the receiver drops as a duplicate).",
    )
    # -- co-inference (issue 6) --
    executor: Literal["local", "cloud", "local-first", "cloud-first"] = Field(
        default="local",
        description="Where the route's readings run: local (never leaves the device), cloud, "
        "local-first (offload when the local backlog exceeds latency_budget_ms) or "
        "cloud-first (local when the cloud fails or its breaker is open). See "
        "docs/co-inference.md.",
    )
    latency_budget_ms: int | None = Field(
        default=None,
        ge=1,
        description="For local-first (required there): offload to the cloud when the estimated "
        "wait in the local backlog (inbox depth x recent mean local latency) exceeds this.",
    )
    ttl_s: float | None = Field(
        default=None,
        gt=0,
        description="Results not delivered within this many seconds of the gateway running "
        "(monotonic time, kept across restarts and reboots) are dropped and counted as "
        "<route>/ttl drops; unset keeps them until delivered or dropped at the bound.",
    )

    @model_validator(mode="after")
    def _check_topics(self) -> Route:
        for topic in self.topics:
            if not topic or "#" in topic[:-1] or any(
                ("+" in level or "#" in level) and len(level) > 1 for level in topic.split("/")
            ):
                raise ValueError(f"invalid MQTT topic filter {topic!r}")
        for name, schema in (("output_schema", self.output_schema),
                             ("input_schema", self.input_schema)):
            problem = schema_problem(schema) if schema is not None else None
            if problem:
                raise ValueError(f"{name} is not a valid JSON schema: {problem}")
        return self

    @model_validator(mode="after")
    def _check_budget(self) -> Route:
        if self.executor == "local-first" and self.latency_budget_ms is None:
            raise ValueError("latency_budget_ms is required when executor is local-first")
        return self

    # -- windows of readings (issue 6, item 5) --
    window_max_readings: int = Field(
        default=1, ge=1, le=256,
        description="Readings of this route put into one prompt and answered by one result; "
        "1 answers each reading on its own (one result per reading, id = the reading's id). "
        "See docs/windows.md.",
    )
    window_max_wait_ms: int = Field(
        default=0, ge=0, le=600_000,
        description="How long a window that is not yet full waits for more readings of its "
        "route before it is inferred as it is; 0 infers whatever the inbox holds at once. Needs "
        "window_max_readings or window_cap_readings above 1.",
    )
    window_cap_readings: int | None = Field(
        default=None, ge=1, le=256,
        description="Coalescing: while the route's inbox backlog exceeds window_max_readings, a "
        "window grows up to this many readings; unset means window_max_readings (no growth). "
        "At least window_max_readings.",
    )

    @model_validator(mode="after")
    def _check_window(self) -> Route:
        cap = self.window_cap_readings
        if cap is not None and cap < self.window_max_readings:
            raise ValueError(f"window_cap_readings ({cap}) must be at least "
                             f"window_max_readings ({self.window_max_readings})")
        if self.window_max_readings == 1 and (cap or 1) == 1 and self.window_max_wait_ms:
            raise ValueError("window_max_wait_ms needs window_max_readings or "
                             "window_cap_readings above 1")
        return self

    @property
    def windowed(self) -> bool:
        """Readings of this route are answered in windows (results cover a list of readings)."""
        return self.window_max_readings > 1 or (self.window_cap_readings or 1) > 1

    @property
    def window_cap(self) -> int:
        """The most readings one window may hold."""
        return self.window_cap_readings or self.window_max_readings
