"""MQTT brokers other than mosquitto, for tests/test_interop.py (issue 14): aedes (Node.js) and
RabbitMQ with its MQTT plugin, each a real process that the test starts on free loopback ports
and stops at teardown. Each offers what the interop scenario needs of tests/harness.py's
Mosquitto: `port`, `start()`, `stop()`, `kill()` and the path of its log.

`unavailable()` says why a broker cannot run on this machine (None when it can): the test skips
with that reason. A broker that is installed but fails to start is an error, not a skip.
This module owns only starting and stopping these brokers; it never touches the system's own
RabbitMQ service (its node, port 5672, its data or its cookie).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.harness import accepts, free_port, wait_until

HERE = Path(__file__).resolve().parent
AEDES_SCRIPT = HERE / "aedes_broker.mjs"
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def node_modules() -> Path:
    """Where tools/bootstrap.sh installs aedes: `node/node_modules` in the virtual environment
    the tests run from ($EDGE_AGENT_NODE_MODULES overrides)."""
    override = os.environ.get("EDGE_AGENT_NODE_MODULES")
    return Path(override) if override else Path(sys.prefix) / "node" / "node_modules"


def _tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class _BrokerProcess:
    """A broker process in its own process group, so that stop and kill reach its children."""

    name = "broker"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / f"{self.name}-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout_s: float = 60.0) -> _BrokerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self._command(), stdout=log, stderr=log, env=self._env(),
                                     cwd=self.dir, start_new_session=True)
        log.close()
        wait_until(lambda: accepts(self.port) or not self.running, timeout_s,
                   f"{self.name} to listen on 127.0.0.1:{self.port} (log: {self.log_path})")
        if not self.running:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                               f"{self.log_path}:\n{_tail(self.log_path)}")
        return self

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the broker's process group; SIGKILL if it is still there after timeout_s."""
        if self.proc is None:
            return
        if self.running:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout_s)
        # Children (beam.smp under RabbitMQ's start script) must not outlive the test.
        self._signal_group(signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=10)


class Aedes(_BrokerProcess):
    """aedes (npm) with its default in-memory persistence, run by tests/aedes_broker.mjs."""

    name = "aedes"

    @staticmethod
    def unavailable() -> str | None:
        if shutil.which("node") is None:
            return "node is not installed (apt-get install nodejs npm), so aedes cannot run"
        if not (node_modules() / "aedes" / "package.json").exists():
            return (f"aedes is not installed in {node_modules()}: run tools/bootstrap.sh "
                    "(it installs aedes with npm when node and npm are present)")
        return None

    def _command(self) -> list[str]:
        return ["node", str(AEDES_SCRIPT), str(node_modules()), str(self.port)]


class RabbitMQ(_BrokerProcess):
    """A second RabbitMQ node of its own, with the rabbitmq_mqtt plugin, next to whatever node
    the system runs: its own node name, ports, data, logs, plugins file, config and Erlang
    cookie (HOME), all under the test's directory. Only epmd (127.0.0.1:4369) is shared: the
    node registers its name there, and starts epmd when none runs."""

    name = "rabbitmq"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.node = f"edgetest{self.port}@localhost"

    @staticmethod
    def unavailable() -> str | None:
        if not RABBITMQ_SERVER.exists():
            return f"RabbitMQ is not installed ({RABBITMQ_SERVER} is missing)"
        plugins = sorted(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/plugins"))
        if not plugins or not list(plugins[-1].glob("rabbitmq_mqtt-*")):
            return "RabbitMQ's rabbitmq_mqtt plugin is not installed"
        return None

    def _command(self) -> list[str]:
        return [str(RABBITMQ_SERVER)]

    def _env(self) -> dict[str, str]:
        home = self.dir / "home"
        for sub in ("home", "mnesia", "log"):
            (self.dir / sub).mkdir(exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        # An empty env file, so that /etc/rabbitmq/rabbitmq-env.conf (the system node's name)
        # is not read.
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = true\n"
            # The agent's batches: more than the default 10 unacked deliveries in flight.
            "mqtt.prefetch = 1000\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            HOME=str(home),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(self.dir / "plugins-expand"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            RABBITMQ_PID_FILE=str(self.dir / "rabbitmq.pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env
