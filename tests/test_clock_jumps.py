"""Wall-clock jumps (FAULTS.md): the agent's wall clock is moved a year forward and then two
days back with libfaketime while results wait for the cloud. Timers, backoff and TTLs run on
monotonic time, so nothing expires, nothing stalls, and everything is delivered."""

from __future__ import annotations

import glob
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.store.views import read_counts
from tests.conftest import Rig
from tests.harness import AgentProcess, CloudCollector, publish_readings, wait_until

LIBFAKETIME = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))

TTL_ROUTES = """
[[routes]]
name = "temperature"
topics = ["sensors/+/temperature"]
instruction = "Classify the temperature reading as normal, warning or critical."
max_tokens = 24
ttl_s = 3600
[routes.output_schema]
type = "object"
required = ["level"]
[routes.output_schema.properties.level]
enum = ["normal", "warning", "critical"]
"""


def readings(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [(f"sensors/s{i % 4}/temperature", json.dumps({"seq": i}).encode())
            for i in range(start, start + n)]


def _year(event: dict[str, object]) -> int:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).year


@pytest.mark.skipif(not LIBFAKETIME, reason="Debian's faketime package is not installed "
                    "(tools/bootstrap.sh installs it)")
def test_wall_clock_jumps_expire_nothing_and_lose_nothing(rig: Rig, tmp_path: Path) -> None:
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()  # its session queues while it is away
    rig.cloud.stop()
    agent = AgentProcess(rig.config(routes=TTL_ROUTES), rig.workdir / "agent.log", env={
        "LD_PRELOAD": LIBFAKETIME[0],
        "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_NO_CACHE": "1",
        # A real clock jump moves CLOCK_REALTIME only; CLOCK_MONOTONIC keeps counting.
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    })
    rig.agents.append(agent)
    agent.start()
    agent.wait_for_event("agent_ready")
    this_year = datetime.now(UTC).year
    publish_readings(rig.local.port, readings(20))
    wait_until(lambda: read_counts(rig.store)["outbox"] == 20, 60, "20 results waiting")

    clock.write_text("+400d\n")  # a year forward: a 3600 s TTL on wall time would expire all
    time.sleep(1.0)
    publish_readings(rig.local.port, readings(10, 20))
    wait_until(lambda: read_counts(rig.store)["outbox"] == 30, 60, "30 results waiting")
    commits = [e for e in agent.events() if e.get("event") == "ingest_batch_committed"]
    assert _year(commits[-1]) > this_year, "the agent's wall clock did not jump"

    clock.write_text("-2d\n")  # and back behind the real time
    time.sleep(1.0)
    publish_readings(rig.local.port, readings(10, 30))
    wait_until(lambda: read_counts(rig.store)["outbox"] == 40, 60, "40 results waiting")
    time.sleep(2.0)  # uplink retries (cloud down) and TTL checks run across the jumps
    assert read_counts(rig.store)["dropped"] == 0

    rig.cloud.start()
    wait_until(lambda: len(collector.distinct_ids()) == 40, 60, "all 40 results delivered")
    assert agent.proc is not None
    assert agent.proc.poll() is None
    collector.stop()
