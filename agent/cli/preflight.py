"""What `edge-agent check-config` and `edge-agent run` both check before the agent touches the
network or the store: the TLS files load, and a model file exists for the worker to load.

Owns these start-up checks only, so that check-config passes exactly the files run accepts (issue
14, item 2): each failure is a ConfigError naming the key and the path (exit 78, which the
systemd unit does not restart). Reads files; opens no socket, no store, starts no worker.
Also owns the advice check-config prints about deadlines that do not agree (`advice`).
"""

from __future__ import annotations

from agent.base.errors import ConfigError
from agent.config.settings import Settings
from agent.ota.state import BASE, ModelStore
from agent.transport import mqtt

# The time the agent needs to kill a worker that missed its deadline and start the next one,
# beyond the model load itself (agent/inference/supervisor.py: terminate, wait, spawn).
RESTART_MARGIN_S = 10.0


def check(settings: Settings) -> None:
    """Raise ConfigError for what would stop `run` at start: an unloadable TLS file, no model."""
    for name in ("local_broker", "cloud_broker"):
        broker = getattr(settings, name)
        if broker.tls:
            mqtt.tls_context(broker, name)
    _check_model(settings)


def _check_model(settings: Settings) -> None:
    """The [model] file must exist, unless an installed OTA version is active (the agent serves
    that one and falls back to [model] only if its file is gone)."""
    path = settings.model.path
    if path.is_file():
        return
    try:
        models = ModelStore(settings.ota_dir)
        state = models.read()
        record = state.installed.get(state.active) if state.active != BASE else None
        if record is not None and (models.model_dir(state.active) / record["file"]).is_file():
            return
    except (OSError, ValueError, KeyError):
        pass  # an unreadable OTA state: the [model] file is what start-up falls back to
    raise ConfigError(
        f"model.path: the model file {path} does not exist (place the first model there; "
        "see docs/operations.md, 'The first model')")


def advice(settings: Settings) -> list[str]:
    """Warnings about values that are valid but make the service's own mechanisms disagree."""
    found: list[str] = []
    stall = settings.service.stall_timeout_s
    bound = max(settings.model.request_timeout_s, settings.model.load_timeout_s)
    if stall <= bound + RESTART_MARGIN_S:
        found.append(
            f"service.stall_timeout_s ({stall:g}) is not above model.request_timeout_s / "
            f"load_timeout_s ({bound:g}) plus {RESTART_MARGIN_S:g} s: systemd's watchdog will "
            "restart the whole agent before the agent's own deadline restarts a hung worker")
    return found
