"""Configuration: one TOML file plus EDGE_AGENT_* environment overrides, read once, frozen.

The only module that imports pydantic-settings and the only one that reads the environment.
Nothing here runs at import time; `load()` is called once by the command line. Every model is
frozen with `extra="forbid"`, so a misspelt key is an error that names it, never a silent default.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from agent.errors import ConfigError
from agent.validation import schema_problem

ENV_PREFIX = "EDGE_AGENT_"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AgentSection(_Section):
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


class BrokerSection(_Section):
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
    reconnect_min_s: float = Field(default=0.5, gt=0, description="First reconnect backoff.")
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
        description="How long a batch may wait for more readings before it is committed.",
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


class StoreSection(_Section):
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
    max_page_count: int | None = Field(
        default=None,
        ge=16,
        description="SQLite PRAGMA max_page_count (4 KiB pages): a hard database size limit. "
        "Tests use it to make the store full; unset means the filesystem is the limit.",
    )


class ModelSection(_Section):
    path: Path = Field(description="The GGUF file the inference worker loads.")
    name: str = Field(default="", description="Model name in results; defaults to the file stem.")
    version: str = Field(default="0", description="Model version in results.")
    n_ctx: int = Field(default=2048, ge=64, description="Context window in tokens.")
    n_threads: int | None = Field(
        default=None, ge=1, description="llama.cpp threads; default lets llama.cpp choose."
    )
    seed: int = Field(default=0, ge=0, description="Sampling seed, for reproducible outputs.")
    load_timeout_s: float = Field(
        default=120.0, gt=0, description="Deadline for the worker to load the model."
    )
    request_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Hard per-request deadline; a worker that misses it is killed and restarted.",
    )
    memory_limit_mb: int | None = Field(
        default=None,
        ge=64,
        description="Address-space limit (RLIMIT_AS) of the inference worker process; unset: no "
        "limit. A worker over it fails to load or to answer, is restarted, and the reading is "
        "retried, then dead-lettered.",
    )


class PipelineSection(_Section):
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Inference attempts per reading (worker crash or timeout) before dead-letter.",
    )
    retry_backoff_s: float = Field(
        default=1.0, ge=0, description="Pause after a failed attempt before the next lease."
    )


class Route(_Section):
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
    # -- co-inference (issue 6) --
    executor: Literal["local", "cloud", "local-first", "cloud-first"] = Field(
        default="local",
        description="Where the route's readings run: local (never leaves the device), cloud, "
        "local-first (offload when the local backlog exceeds latency_budget_ms) or "
        "cloud-first (local when the cloud fails or its breaker is open).",
    )
    latency_budget_ms: int | None = Field(
        default=None,
        ge=1,
        description="For local-first: offload to the cloud when the estimated wait in the local "
        "backlog (inbox depth x recent mean local latency) exceeds this.",
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
        "1 answers each reading on its own (one result per reading, id = the reading's id).",
    )
    window_max_wait_ms: int = Field(
        default=0, ge=0, le=600_000,
        description="How long a window that is not yet full waits for more readings of its "
        "route before it is inferred as it is; 0 infers whatever the inbox holds at once.",
    )
    window_cap_readings: int | None = Field(
        default=None, ge=1, le=256,
        description="Coalescing: while the route's inbox backlog exceeds window_max_readings, a "
        "window grows up to this many readings; unset means window_max_readings (no growth).",
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


class CloudModelSection(_Section):
    """The cloud executor (issue 6): any OpenAI-compatible chat-completions endpoint."""

    base_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="Base URL of the OpenAI-compatible API including /v1 (POST "
        "<base_url>/chat/completions); unset means no cloud model: every route must be local.",
    )
    model: str = Field(
        default="", description="Model name sent with each request and recorded in results."
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
        default=10.0, gt=0, description="Deadline of one cloud request, connect to last byte."
    )
    response_format: Literal["json_schema", "json_object"] = Field(
        default="json_schema",
        description="How the route's schema is sent: json_schema (OpenAI, vLLM, Ollama) or "
        "json_object with a schema key (llama-cpp-python's server).",
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


class OtaSection(_Section):
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
        from agent.signing import SignatureError, parse_public_key

        for index, key in enumerate(self.trusted_keys):
            try:
                parse_public_key(key)
            except SignatureError as exc:
                raise ValueError(f"trusted_keys[{index}]: {exc}") from exc
        return self


class Settings(BaseSettings):
    """The whole configuration. Build it with `load()`, never directly."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
    )

    agent: AgentSection = Field(description="Identity, state directory, logging, shutdown.")
    local_broker: LocalBrokerSection = Field(
        default_factory=LocalBrokerSection, description="The gateway's own MQTT broker (input)."
    )
    cloud_broker: CloudBrokerSection = Field(
        default_factory=CloudBrokerSection, description="The cloud MQTT broker (output)."
    )
    model: ModelSection = Field(description="The local GGUF model.")
    pipeline: PipelineSection = Field(
        default_factory=PipelineSection, description="Retry policy of the inference pipeline."
    )
    routes: list[Route] = Field(min_length=1, description="Which readings go to which prompt.")
    service: ServiceSection = Field(
        default_factory=lambda: ServiceSection(),
        description="systemd watchdog, status, metrics and health endpoints.",
    )
    cloud_model: CloudModelSection = Field(
        default_factory=CloudModelSection,
        description="The cloud model that non-local routes may use.",
    )
    store: StoreSection = Field(
        default_factory=StoreSection, description="Bounds of the SQLite store."
    )
    ota: OtaSection = Field(
        default_factory=OtaSection, description="Over-the-air model updates."
    )

    @model_validator(mode="after")
    def _unique_routes(self) -> Settings:
        names = [route.name for route in self.routes]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"route names must be unique; repeated: {', '.join(duplicated)}")
        return self

    @model_validator(mode="after")
    def _cloud_for_cloud_routes(self) -> Settings:
        if self.cloud_model.base_url is None:
            for index, route in enumerate(self.routes):
                if route.executor != "local":
                    raise ValueError(
                        f"routes[{index}].executor is {route.executor!r} but "
                        "cloud_model.base_url is not set"
                    )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (the file arrives as init kwargs); no .env files.
        return (env_settings, init_settings)

    @property
    def store_path(self) -> Path:
        return self.agent.state_dir / "agent.db"

    @property
    def ota_dir(self) -> Path:
        """OTA state file, lock, reports and installed models (models/<version>/)."""
        return self.agent.state_dir / "ota"

    @property
    def incoming_dir(self) -> Path:
        """Where model packages are dropped (by an operator or `edge-agent model install`)."""
        return self.agent.state_dir / "incoming"

    @property
    def model_name(self) -> str:
        return self.model.name or self.model.path.stem


def load(path: Path) -> Settings:
    """Read and validate the configuration file; raise ConfigError naming the file and key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe(exc)}") from exc
    settings = _with_credentials(settings, os.environ.get("CREDENTIALS_DIRECTORY"))
    return _read_cloud_key(_resolve_paths(settings, path.parent), path.parent)


def describe(exc: ValidationError) -> str:
    """One line per problem, each naming the key as a dotted path (routes[0].max_tokens)."""
    lines = []
    for error in exc.errors():
        key = _dotted(error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required key is missing"
        env = ENV_PREFIX + "__".join(str(p) for p in error["loc"] if isinstance(p, str)).upper()
        lines.append(f"{key}: {message} (set in the file or by {env})")
    return "; ".join(lines)


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    """Relative paths in the file are relative to the file, not to the working directory."""
    state_dir = settings.agent.state_dir
    model_path = settings.model.path
    agent = settings.agent.model_copy(
        update={"state_dir": state_dir if state_dir.is_absolute() else base / state_dir}
    )
    model = settings.model.model_copy(
        update={"path": model_path if model_path.is_absolute() else base / model_path}
    )
    brokers: dict[str, BrokerSection] = {}
    for role in ("local_broker", "cloud_broker"):
        broker: BrokerSection = getattr(settings, role)
        files = {key: getattr(broker, key) for key in ("ca_file", "cert_file", "key_file")}
        brokers[role] = broker.model_copy(update={
            key: value if value is None or value.is_absolute() else base / value
            for key, value in files.items()
        })
    return settings.model_copy(update={"agent": agent, "model": model, **brokers})



class ServiceSection(_Section):
    """How the agent runs under systemd and shows itself to operators."""

    stall_timeout_s: float = Field(
        default=180.0,
        gt=0,
        description="A critical loop busy on one unit of work (an ingest commit, an inference "
        "request, a model load, a publish window) for longer than this is stalled: systemd "
        "watchdog pings stop. Keep it above model.request_timeout_s and model.load_timeout_s.",
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


# systemd credential names (LoadCredential=NAME:PATH) and the broker key each one fills.
CREDENTIALS = {
    "password": "{role}-broker-password",
    "ca_file": "{role}-broker-ca",
    "cert_file": "{role}-broker-cert",
    "key_file": "{role}-broker-key",
}


def _with_credentials(settings: Settings, directory: str | None) -> Settings:
    """Fill broker secrets that the file and the environment leave unset from systemd's
    $CREDENTIALS_DIRECTORY (LoadCredential=): passwords by value, TLS files by path."""
    if not directory:
        return settings
    base = Path(directory)
    updates: dict[str, BrokerSection] = {}
    for section in ("local_broker", "cloud_broker"):
        broker: BrokerSection = getattr(settings, section)
        role = section.removesuffix("_broker")
        found: dict[str, Any] = {}
        for key, pattern in CREDENTIALS.items():
            credential = base / pattern.format(role=role)
            if getattr(broker, key) is not None or not credential.is_file():
                continue
            if key != "password" and not broker.tls:
                continue  # TLS files mean nothing on a plaintext link; _check_tls says so
            if key == "password":
                try:
                    secret = credential.read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConfigError(
                        f"{section}.password: cannot read credential {credential.name}"
                    ) from exc
                found[key] = SecretStr(secret)
            else:
                found[key] = credential
        if found:
            updates[section] = broker.model_copy(update=found)
    return settings.model_copy(update=updates)


@dataclass(frozen=True, slots=True)
class ServiceEnvironment:
    """What systemd tells the service through the environment (sd_notify(3),
    sd_watchdog_enabled(3)). Read here, in the one module that reads the environment, only when
    `service_environment()` is called at start-up, never at import time.
    """

    notify_socket: str | None
    watchdog_usec: int | None
    watchdog_pid: int | None


def service_environment() -> ServiceEnvironment:
    """$NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID as systemd set them, or None each."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    return ServiceEnvironment(
        notify_socket=os.environ.get("NOTIFY_SOCKET") or None,
        watchdog_usec=int(usec) if usec.isdigit() and int(usec) > 0 else None,
        watchdog_pid=int(pid) if pid.isdigit() else None,
    )


# ServiceSection is defined after Settings (appended with the service work); resolve the reference.
Settings.model_rebuild()
def _read_cloud_key(settings: Settings, base: Path) -> Settings:
    """Read cloud_model.api_key_file once, unless the key was given directly."""
    cloud = settings.cloud_model
    if cloud.api_key_file is None or cloud.api_key is not None:
        return settings
    key_path = cloud.api_key_file if cloud.api_key_file.is_absolute() else base / cloud.api_key_file
    try:
        key = key_path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cloud_model.api_key_file: cannot read {key_path}: {exc}") from exc
    if not key:
        raise ConfigError(f"cloud_model.api_key_file: {key_path} is empty")
    cloud = cloud.model_copy(update={"api_key": SecretStr(key), "api_key_file": key_path})
    return settings.model_copy(update={"cloud_model": cloud})
