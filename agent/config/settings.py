"""Configuration: one TOML file plus EDGE_AGENT_* environment overrides, read once, frozen.

The one typed place the agent's configuration comes from: `Settings` and `load()` live here,
with the checks across sections, path resolution and systemd credentials; the section models are
declared in agent/config/sections.py and agent/config/routes.py and re-exported here (`__all__`),
so every caller imports configuration from this module. The only module that imports
pydantic-settings and the only one that reads the environment. Nothing here runs at import time;
`load()` is called once by the command line. Every model is frozen with `extra="forbid"`, so a
misspelt key is an error that names it, never a silent default.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from agent.base.errors import ConfigError
from agent.config.routes import Route
from agent.config.sections import (
    AgentSection,
    BrokerSection,
    CloudBrokerSection,
    CloudModelSection,
    LocalBrokerSection,
    ModelSection,
    OtaSection,
    PipelineSection,
    ServiceSection,
    StoreSection,
)

__all__ = [
    "CREDENTIALS",
    "ENV_PREFIX",
    "AgentSection",
    "BrokerSection",
    "CloudBrokerSection",
    "CloudModelSection",
    "ConfigError",
    "LocalBrokerSection",
    "ModelSection",
    "OtaSection",
    "PipelineSection",
    "Route",
    "ServiceEnvironment",
    "ServiceSection",
    "Settings",
    "StoreSection",
    "describe",
    "load",
    "service_environment",
]

ENV_PREFIX = "EDGE_AGENT_"


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
        default_factory=ServiceSection,
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
            if getattr(broker, key) is not None or not _credential_present(credential):
                continue
            if key != "password" and not broker.tls:
                continue  # TLS files mean nothing on a plaintext link; _check_tls says so
            if key == "password":
                try:
                    secret = credential.read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConfigError(
                        f"{section}.password: cannot read credential {credential}: {exc}"
                    ) from exc
                found[key] = SecretStr(secret)
            else:
                found[key] = credential
        if found:
            updates[section] = broker.model_copy(update=found)
    return settings.model_copy(update=updates)


def _credential_present(credential: Path) -> bool:
    """Is this credential there? Looked up by name, never by listing the directory: systemd
    252 lets an ExecReload= process of a PrivateUsers= unit read the files but not list the
    directory (EACCES). A directory the user cannot search is a clear refusal naming it, not a
    traceback."""
    try:
        return stat.S_ISREG(credential.stat().st_mode)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot read the credentials directory {credential.parent} "
                          f"($CREDENTIALS_DIRECTORY): {exc.strerror}") from exc


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
