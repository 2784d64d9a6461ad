"""Real parts for the demo and the tests: mosquitto brokers on free loopback ports, the agent as a
subprocess whose JSON log can be awaited, and a cloud-side collector with a persistent session.

Nothing here is a fake: brokers are real `mosquitto` processes that can be stopped, SIGKILLed and
restarted on the same port with their persistence; the agent is `python -m agent run`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str,
               interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def accepts(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port` (a broker or server that has started)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Mosquitto:
    """A mosquitto process on 127.0.0.1:`port`, configured from configs/mosquitto-<role>.conf."""

    def __init__(self, role: str, workdir: Path, port: int | None = None,
                 listener_options: str = "") -> None:
        """`listener_options` go right after the `listener` line (e.g. TLS settings; more
        `listener` lines may follow for extra listeners)."""
        if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.role = role
        self.port = port or free_port()
        self.dir = workdir / f"mosquitto-{role}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        base = (CONFIGS / f"mosquitto-{role}.conf").read_text()
        extra = [f"listener {self.port} 127.0.0.1", listener_options,
                 f"persistence_location {self.dir}/"]
        if os.geteuid() == 0:
            extra.append("user root")  # else mosquitto drops to a user that cannot write here
        self.conf.write_text(base + "\n" + "\n".join(extra) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        log = (self.dir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_until(lambda: accepts(self.port) or not self.running, timeout_s,
                   f"mosquitto {self.role} on port {self.port}")
        if not self.running:
            raise RuntimeError(f"mosquitto {self.role} exited; see {self.dir / 'mosquitto.log'}")
        return self

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits."""
        if self.running and self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: state since the last autosave is lost, as after a power cut."""
        if self.running and self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


class AgentProcess:
    """`python -m agent run --config FILE` with its JSON log lines captured to a file."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self) -> AgentProcess:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        out = self.log_path.open("ab")
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=out, stderr=out, cwd=REPO, env=env,
        )
        return self

    def events(self, since_start: bool = True) -> list[dict[str, Any]]:
        """Every JSON log event of this run (or of every run if since_start is False)."""
        if not self.log_path.exists():
            return []
        with self.log_path.open("rb") as handle:
            if since_start:
                handle.seek(self._offset)
            lines = handle.read().decode(errors="replace").splitlines()
        events = []
        for line in lines:
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return events

    def wait_for_event(self, name: str, timeout_s: float = 60.0) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode} before {name}; "
                                   f"log: {self.log_path}")
            found[:] = [e for e in self.events() if e.get("event") == name]
            return bool(found)

        wait_until(seen, timeout_s, f"agent event {name}", interval_s=0.1)
        return found[0]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)


class CloudCollector:
    """A cloud-side subscriber with a persistent session that keeps every message it receives."""

    def __init__(self, port: int, topic: str = "edge/#", client_id: str = "test-collector") -> None:
        self.port = port
        self.topic = topic
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   clean_session=False)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.1, 1)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, json.loads(message.payload)))

    def start(self) -> CloudCollector:
        """Connect once (the broker must be up) so the session and its subscription exist."""
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *args: subscribed.set()
        self._client.connect("127.0.0.1", self.port, keepalive=5)
        self._client.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("collector did not subscribe")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def results(self, kind: str = "results") -> list[dict[str, Any]]:
        with self._lock:
            return [body for topic, body in self.messages if topic.split("/")[2] == kind]

    def distinct_ids(self, kind: str = "results") -> set[str]:
        return {body["id"] for body in self.results(kind)}


def publish_readings(
    port: int, readings: list[tuple[str, bytes]], client_id: str = "sensors"
) -> None:
    """Publish with QoS 1 and wait for every PUBACK from the local broker.

    Publishing starts after the CONNACK: a publish while paho has no socket fails at once
    (MQTT_ERR_NO_CONN), and a connection the broker dropped before its CONNACK is made again
    by paho's loop (seen once in a full run: "The client is not currently connected")."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(100)
    connected = threading.Event()

    def on_connect(_client: paho.Client, _userdata: Any, _flags: Any, reason: Any,
                   _properties: Any) -> None:
        if not reason.is_failure:
            connected.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        if not connected.wait(30):
            raise TimeoutError(f"no CONNACK from the broker on port {port}")
        infos = [client.publish(topic, payload, qos=1) for topic, payload in readings]
        for info in infos:
            info.wait_for_publish(timeout=30)
            if not info.is_published():
                raise TimeoutError(f"no PUBACK for message {info.mid}")
    finally:
        client.disconnect()
        client.loop_stop()


TEST_ROUTES = """
[[routes]]
name = "temperature"
topics = ["sensors/+/temperature"]
instruction = "Classify the temperature reading as normal, warning or critical."
max_tokens = 24
[routes.output_schema]
type = "object"
required = ["level"]
additionalProperties = false
[routes.output_schema.properties.level]
enum = ["normal", "warning", "critical"]
"""


def write_agent_config(
    path: Path,
    *,
    state_dir: Path,
    model_path: Path,
    local_port: int,
    cloud_port: int,
    device_id: str = "gw-test",
    routes: str = TEST_ROUTES,
    extra: str = "",
    service: str = "metrics_port = 0",
) -> Path:
    """A configuration for an agent between two loopback brokers, with fast reconnects."""
    path.write_text(f"""
[agent]
device_id = "{device_id}"
state_dir = "{state_dir}"
log_level = "debug"
drain_timeout_s = 10

[local_broker]
port = {local_port}
reconnect_min_s = 0.1
reconnect_max_s = 1.0
keepalive_s = 5

[cloud_broker]
port = {cloud_port}
reconnect_min_s = 0.1
reconnect_max_s = 1.0
keepalive_s = 5
publish_timeout_s = 5

[model]
path = "{model_path}"
name = "tiny-test"
version = "1"
n_ctx = 512
n_threads = 1
request_timeout_s = 20
{extra}
[service]
{service}
{routes}
""")
    return path


class LlamaServer:
    """The cloud model for tests (issue 6): `python -m llama_cpp.server` serving a GGUF on
    127.0.0.1:`port`, an OpenAI-compatible endpoint. Its access log (uvicorn's, in `log_path`)
    counts the chat-completion requests that reached it, across restarts on the same port."""

    def __init__(self, model: Path, workdir: Path, *, alias: str = "cloud-tiny",
                 api_key: str = "test-cloud-key", port: int | None = None) -> None:
        self.model = model
        self.alias = alias
        self.api_key = api_key
        self.port = port or free_port()
        self.log_path = workdir / f"llama-server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 60.0) -> LlamaServer:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model),
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "512",
             "--n_threads", "1", "--model_alias", self.alias, "--api_key", self.api_key],
            stdout=log, stderr=log, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        wait_until(lambda: accepts(self.port) or not self.running, timeout_s,
                   f"llama_cpp.server on port {self.port}")
        if not self.running:
            raise RuntimeError(f"llama_cpp.server exited; see {self.log_path}")
        return self

    def kill(self) -> None:
        """SIGKILL, as a cloud that vanishes mid-request."""
        if self.running and self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def requests(self) -> int:
        """Chat-completion requests the server received (every start, every status)."""
        if not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count('"POST /v1/chat/completions ')
