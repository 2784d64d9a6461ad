"""FAULTS.md "model cannot be loaded" on real parts: the active GGUF damaged on disk while the agent
serves, the worker killed, then the file repaired."""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.error
import urllib.request
from pathlib import Path

from agent.config.settings import load
from agent.service.metrics import scrape
from agent.store.views import read_counts
from tests.conftest import Rig, inbox_attempts
from tests.harness import CloudCollector, publish_readings, wait_until


def readings(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [(f"sensors/s{i % 3}/temperature", json.dumps({"seq": i, "celsius": 20}).encode())
            for i in range(start, start + n)]


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_model_damaged_on_disk_keeps_readings_waiting_until_it_is_repaired(
    rig: Rig, tmp_path: Path,
) -> None:
    """The active GGUF truncated and its worker killed: readings published meanwhile stay in the
    inbox at attempt 0 (none dead-lettered) across several failed restarts, /readyz says why
    it is not ready, `model_unavailable` is logged once; once the file is restored the agent
    answers every reading by itself, logs `model_recovered` and is ready again."""
    model = tmp_path / "active.gguf"
    shutil.copyfile(rig.model, model)
    good = model.read_bytes()
    rig.model = model
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    config = rig.config(service="metrics_port = 0")
    agent = rig.agent(config)
    agent.wait_for_event("agent_ready")
    port = agent.wait_for_event("metrics_serving")["port"]
    worker = agent.wait_for_event("worker_ready")["pid"]
    publish_readings(rig.local.port, readings(3))
    wait_until(lambda: len(collector.distinct_ids()) == 3, 60, "the first 3 results")

    with model.open("r+b") as handle:  # damaged on disk: the tensor data cut off
        handle.truncate(len(good) // 2)
    os.kill(worker, signal.SIGKILL)
    # Published once the agent has reaped the dead worker: a reading sent to a worker whose
    # death the agent has not yet seen is charged the crash (it may have caused it).
    wait_until(lambda: not Path(f"/proc/{worker}").exists(), 30, "the killed worker reaped")
    publish_readings(rig.local.port, readings(5, 3))
    wait_until(lambda: len(inbox_attempts(rig.store)) == 5, 60, "5 readings in the inbox")
    wait_until(lambda: sum(e.get("event") == "worker_restarting" for e in agent.events()) >= 3,
               120, "three restarts that could not load the model")
    unavailable = [e for e in agent.events() if e.get("event") == "model_unavailable"]
    assert len(unavailable) == 1, unavailable
    assert unavailable[0]["path"] == str(model)
    status, body = readyz(port)
    assert status == 503
    assert "model unavailable" in body, body
    assert read_counts(rig.store)["dead_letter"] == 0
    # Five readings wait, none charged for the model's failure: those leased right now (one,
    # or up to `[model] max_batch` of a backlog) count their attempt until it is refunded.
    attempts = inbox_attempts(rig.store)
    assert max(attempts) <= 1, attempts
    assert attempts.count(1) <= load(config).model.max_batch, attempts
    assert len(collector.distinct_ids()) == 3

    model.write_bytes(good)
    wait_until(lambda: len(collector.distinct_ids()) == 8, 120, "all 8 results after the repair")
    assert all(body["status"] == "ok" for body in collector.results())
    recovered = agent.wait_for_event("model_recovered", 10)
    assert recovered["failures"] >= 2
    wait_until(lambda: readyz(port)[0] == 200, 30, "/readyz 200 again")

    def load_failures() -> float:
        series = scrape(f"http://127.0.0.1:{port}/metrics")
        return series["edge_agent_model_load_failures_total"][0][1]
    wait_until(lambda: load_failures() == recovered["failures"], 30,
               "the load failures counted in /metrics")
    assert read_counts(rig.store)["dead_letter"] == 0
    assert agent.proc is not None
    assert agent.proc.poll() is None
    collector.stop()
