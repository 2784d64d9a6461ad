"""The sections of the configuration file: [agent], [local_broker], [cloud_broker], [store],
[model], [pipeline], [cloud_model], [ota] and [service]. Each model owns its keys' types, units,
defaults and descriptions, and the checks that involve its own keys only.

Declarations only: nothing here reads files or the environment, and nothing runs at import time.
`agent.config` assembles these into `Settings`, loads them and re-exports them; the rest of the
agent imports them from there. Every model is frozen with `extra="forbid"`, so a misspelt key is
an error that names it, never a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class Section(BaseModel):
    """Base of every section and of `Route`: frozen, and an unknown key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class AgentSection(Section):
    device_id: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="This gateway's id; it names the cloud topics edge/<device_id>/...",
    )
    state_dir: Path = Field(
        default=Path("/var/lib/edge-agent"),
        description="Directory for the SQLite store and other state that must survive restarts.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level of the JSON log lines written to stdout."
    )
    drain_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="On SIGTERM, how long to finish the item in hand and flush the uplink.",
    )


class BrokerSection(Section):
    host: str = Field(default="127.0.0.1", description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker TCP port.")
    client_id: str | None = Field(
        default=None,
        description="MQTT client id; defaults to edge-agent-<device_id>-<role>. Keep it fixed: "
        "the persistent session is keyed by it.",
    )
    username: str | None = Field(
        default=None, description="MQTT user name, if the broker wants one."
    )
    password: SecretStr | None = Field(
        default=None,
        description="MQTT password; prefer EDGE_AGENT_<SECTION>__PASSWORD over the file.",
    )
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive interval.")
    connect_timeout_s: float = Field(default=10.0, gt=0, description="Deadline for CONNACK.")
    reconnect_min_s: float = Field(default=0.5, gt=0, description="First reconnect backoff; each "
                                   "further retry doubles the ceiling, up to reconnect_max_s, "
                                   "and waits a random time below it (full jitter), at least "
                                   "half of this.")
    reconnect_max_s: float = Field(default=30.0, gt=0, description="Cap of the reconnect backoff.")
    tls: bool = Field(
        default=False,
        description="Connect with TLS, verifying the broker's certificate; never falls back to "
        "plaintext.",
    )
    ca_file: Path | None = Field(
        default=None,
        description="PEM file of the CA(s) that sign the broker's certificate; default: the "
        "system's trust store. Also read from the credential <role>-broker-ca.",
    )
    cert_file: Path | None = Field(
        default=None,
        description="PEM client certificate for mutual TLS. Also read from the credential "
        "<role>-broker-cert.",
    )
    key_file: Path | None = Field(
        default=None,
        description="PEM private key of cert_file. Also read from the credential "
        "<role>-broker-key.",
    )

    @model_validator(mode="after")
    def _check_tls(self) -> BrokerSection:
        given = [key for key in ("ca_file", "cert_file", "key_file") if getattr(self, key)]
        if given and not self.tls:
            raise ValueError(f"{', '.join(given)} given but tls = false: set tls = true")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self


class LocalBrokerSection(BrokerSection):
    batch_max_messages: int = Field(
        default=256, ge=1, le=10_000, description="Most readings committed in one transaction."
    )
    batch_wait_ms: int = Field(
        default=20,
        ge=0,
        le=5_000,
        description="How long a batch may wait for more readings before it is committed; "
        "paid only inside a stream (a reading that comes alone is committed at once).",
    )
    max_payload_bytes: int = Field(
        default=64 * 1024, ge=16, description="Larger payloads are dead-lettered before decoding."
    )
    max_json_depth: int = Field(
        default=32, ge=1, le=512, description="Deeper JSON payloads are dead-lettered."
    )
    max_readings_per_s_per_topic: float | None = Field(
        default=None,
        gt=0,
        description="Load shedding: a topic sending faster than this on average has the excess "
        "dead-lettered (reason 'shed: ...'), so a flooding sensor cannot crowd out the others; "
        "unset sheds nothing.",
    )
    burst_readings_per_topic: int = Field(
        default=20, ge=1, description="Readings a topic may send at once above its rate."
    )


class CloudBrokerSection(BrokerSection):
    publish_timeout_s: float = Field(
        default=10.0, gt=0, description="Deadline for a PUBACK before the link is deemed broken."
    )
    inflight_window: int = Field(
        default=64, ge=1, le=1000, description="Outbox rows published before waiting for PUBACKs."
    )
    topic_prefix: str = Field(
        default="edge", description="Cloud topics are <topic_prefix>/<device_id>/..."
    )


class StoreSection(Section):
    max_outbox_rows: int = Field(
        default=1_000_000,
        ge=1,
        description="Most rows waiting for the cloud (results, dead-letter reports); "
        "readings still in the inbox count against it too.",
    )
    max_outbox_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1024,
        description="Most payload bytes waiting for the cloud, inbox included.",
    )
    when_full: Literal["drop_oldest", "refuse_input"] = Field(
        default="drop_oldest",
        description="At the bound: drop_oldest deletes the lowest-priority, oldest outbox rows "
        "(counted per route and reported on <prefix>/<device_id>/drops); refuse_input stops "
        "acking readings so the local broker keeps them.",
    )
    reserve_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=0,
        description="Ingest stops acking while less than this is free for the store (free "
        "filesystem space, or room under max_page_count): room the pipeline needs to turn "
        "waiting readings into results.",
    )
    drain_reserve_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=0,
        description="A file of this size kept beside the store (<db>-reserve) that input "
        "never spends: when the filesystem is full, a lease, a result, an expiry or the delete "
        "of a delivered row releases it (results may use half of it, the rest stays for the "
        "deliveries), so the store empties by itself once the cloud returns; it is taken "
        "again when the store has room for it. The WAL is folded into the database at a "
        "quarter of it, so that releasing it always covers that. 0: none.",
    )
    history_max_rows: int = Field(
        default=10_000,
        ge=0,
        description="Answered readings kept after delivery for `edge-agent queue export` (the "
        "route, topic, reading, output and model of each ok result: 243 bytes a row with a "
        "70-byte reading, 2.4 MB at the default): the oldest beyond this are deleted, and the "
        "history is dropped first, before anything durable, when the store's room falls under "
        "twice reserve_bytes. 0: none kept.",
    )
    max_page_count: int | None = Field(
        default=None,
        ge=16,
        description="SQLite PRAGMA max_page_count (4 KiB pages): a hard database size limit. "
        "Tests use it to make the store full; unset means the filesystem is the limit.",
    )


class ModelSection(Section):
    path: Path = Field(description="The GGUF file the inference worker loads.")
    name: str = Field(default="", description="Model name in results; defaults to the file stem.")
    version: str = Field(default="0", description="Model version in results.")
    n_ctx: int = Field(default=2048, ge=64, description="Context window in tokens.")
    n_threads: int | None = Field(
        default=None,
        ge=1,
        description="Threads llama.cpp uses to generate each token; unset: llama.cpp chooses "
        "(half the cores).",
    )
    n_threads_batch: int | None = Field(
        default=None,
        ge=1,
        description="Threads llama.cpp uses to evaluate the prompt (batch processing); unset: "
        "n_threads, so n_threads bounds the worker's cores (llama.cpp alone would use every "
        "core for the prompt); both unset: llama.cpp chooses (every core).",
    )
    max_batch: int = Field(
        default=8,
        ge=1,
        le=8,
        description="Readings of a backlog decoded together in one llama.cpp batch when more "
        "than one waits (issue 16; docs/benchmarks.md: 1.7-2.2x the results/s of one at a time "
        "on the bench model); a lone reading is decoded alone. Each batched reading needs its "
        "own room in the context (`n_ctx`): fewer go together when they do not fit. The gain "
        "comes from the sequences kept between batches, one per recent topic: with fewer than "
        "a backlog has topics it fades (bench, 8 topics: 1.8-2x at 8, 0.9x at 4). 1: one "
        "reading at a time.",
    )
    seed: int = Field(default=0, ge=0, description="Sampling seed, for reproducible outputs.")
    load_timeout_s: float = Field(
        default=120.0, gt=0, description="Deadline for the worker to load the model."
    )
    request_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Hard per-request deadline; a worker that misses it (hung, SIGSTOPped, "
        "looping) is killed and restarted by the agent, and the reading retried. It catches a "
        "hung worker; service.stall_timeout_s, above it, catches a hung agent.",
    )
    memory_limit_mb: int | None = Field(
        default=None,
        ge=64,
        description="Address-space limit (RLIMIT_AS) of the inference worker process; unset: no "
        "limit. A worker over it fails to load or to answer, is restarted, and the reading is "
        "retried, then dead-lettered.",
    )

    @property
    def threads_batch(self) -> int | None:
        """Prompt-processing threads passed to llama.cpp: n_threads_batch, else n_threads."""
        return self.n_threads_batch or self.n_threads


class PipelineSection(Section):
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Attempts per reading (a worker crash or timeout, or any failure the "
        "reading may cause) before dead-letter; a failure of the model's load or of the "
        "cloud's link is not counted.",
    )
    retry_backoff_s: float = Field(
        default=1.0, ge=0, description="Pause after a failed attempt before the next lease."
    )


class CloudModelSection(Section):
    """The cloud executor (issue 6): any OpenAI-compatible chat-completions endpoint."""

    base_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="Base URL of the OpenAI-compatible API including /v1 (POST "
        "<base_url>/chat/completions); unset means no cloud model: every route must be local.",
    )
    model: str = Field(
        default="",
        description="Model name sent with each request and recorded in results (the name the "
        "endpoint answers with wins).",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="Bearer token; give it as EDGE_AGENT_CLOUD_MODEL__API_KEY or api_key_file, "
        "not in this file.",
    )
    api_key_file: Path | None = Field(
        default=None,
        description="File holding the bearer token (e.g. a systemd credential under "
        "$CREDENTIALS_DIRECTORY); read once at start.",
    )
    timeout_s: float = Field(
        default=10.0, gt=0, description="Deadline of one cloud request, connect to last byte "
        "(one deadline around the whole request: an endpoint that trickles its answer is cut "
        "at this time too)."
    )
    response_format: Literal["json_schema", "json_object"] = Field(
        default="json_schema",
        description="How the route's schema is sent: json_schema (OpenAI, vLLM, Ollama) or "
        "json_object with a schema key (llama-cpp-python's server, which refuses json_schema).",
    )
    failure_threshold: int = Field(
        default=3, ge=1, le=1000,
        description="Consecutive cloud failures that open the circuit breaker.",
    )
    cooldown_s: float = Field(
        default=30.0, gt=0,
        description="How long the open breaker keeps requests local before one probe is let "
        "through (half-open).",
    )


class OtaSection(Section):
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="ed25519 public keys (base64 of the 32 raw bytes) whose model signatures "
        "are trusted; empty refuses every update.",
    )
    canary_latency_budget_ms: float = Field(
        default=10_000.0, gt=0,
        description="A canary answer slower than this fails the candidate model (a manifest "
        "may only tighten it).",
    )
    golden_max_items: int = Field(
        default=200, ge=1,
        description="The canary asks at most this many items of each golden set a package "
        "carries (an even spread of a larger set).",
    )
    probation_golden_items: int = Field(
        default=20, ge=0,
        description="At the end of probation this many items of each golden set (an even "
        "spread) are asked again through the serving worker, one at a time; 0 skips it.",
    )
    probation_requests: int = Field(
        default=50, ge=1, description="Probation ends after this many requests on the new model."
    )
    probation_max_s: float = Field(
        default=600.0, gt=0, description="Probation ends after this long even with fewer requests."
    )
    probation_max_error_rate: float = Field(
        default=0.05, ge=0, le=1,
        description="Share of failed inference requests (crash, timeout) that fails probation.",
    )
    probation_max_schema_failure_rate: float = Field(
        default=0.2, ge=0, le=1,
        description="Share of answers failing the route's schema that fails probation.",
    )
    probation_latency_factor: float = Field(
        default=3.0, ge=1,
        description="Probation fails if the new model's p95 latency exceeds the previous "
        "model's p95 times this.",
    )
    max_trial_starts: int = Field(
        default=1, ge=1, le=10,
        description="Starts after a crash that find a model on trial: below this the trial "
        "resumes, at it the trial rolls back and the version is failed. 1 (the default) rolls "
        "back after the first crash; 2 lets a trial survive one power cut. A graceful stop "
        "does not count.",
    )
    watch_debounce_s: float = Field(
        default=1.0, ge=0,
        description="Quiet time after the last change in incoming/ before a package is read.",
    )
    download_timeout_s: float = Field(
        default=30.0, gt=0,
        description="A model download (cloud command) whose connect or any read waits longer "
        "than this is cut and resumed with a Range request.",
    )
    download_attempts: int = Field(
        default=5, ge=1, le=100,
        description="Connections tried per model download (each resuming where the last one "
        "was cut) before the command is reported failed.",
    )
    download_max_bytes: int = Field(
        default=8 << 30, ge=1,
        description="A model command whose manifest declares a larger file is refused "
        "before anything is downloaded.",
    )

    @model_validator(mode="after")
    def _check_keys(self) -> OtaSection:
        from agent.base.signing import SignatureError, parse_public_key

        for index, key in enumerate(self.trusted_keys):
            try:
                parse_public_key(key)
            except SignatureError as exc:
                raise ValueError(f"trusted_keys[{index}]: {exc}") from exc
        return self


class ServiceSection(Section):
    """How the agent runs under systemd and shows itself to operators."""

    stall_timeout_s: float = Field(
        default=150.0,
        gt=0,
        description="A critical loop busy on one unit of work (an ingest commit, an inference "
        "request, a model load, a publish window) for longer than this is stalled: systemd "
        "watchdog pings stop and systemd restarts the agent (after WatchdogSec more at most). "
        "The backstop for a stuck agent: keep it above model.request_timeout_s and "
        "model.load_timeout_s plus 10 s (check-config warns otherwise), so that a hung worker "
        "is killed by its own deadline first and only a loop stuck past every deadline of its "
        "own restarts the whole agent.",
    )
    status_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="How often the retained MQTT status is refreshed.",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the /metrics, /healthz and /readyz endpoint listens on; keep it on "
        "loopback unless a firewall guards it.",
    )
    metrics_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="TCP port of the metrics endpoint; 0 picks a free port (logged as "
        "metrics_serving).",
    )
    metrics_enabled: bool = Field(
        default=True, description="Serve /metrics, /healthz and /readyz."
    )
