"""A model update by cloud command through the real agent process, both real mosquitto
brokers and a real HTTP server: the command is published on the cloud broker, the agent
downloads the GGUF (the server resets the first connection mid-file), and the one pipeline
verifies, canaries, switches and commits it while readings keep flowing."""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.ota.modelpkg import MANIFEST, SIGNATURE
from tests.conftest import Rig
from tests.fileserver import FileServer, Served
from tests.harness import CloudCollector, publish_readings, wait_until
from tests.otakit import keypair, package
from tests.test_ota_agent import Sensors, ota_config, steps


def test_a_cloud_command_downloads_and_commits_a_model_while_readings_flow(
    rig: Rig, tmp_path: Path
) -> None:
    key, public = keypair(tmp_path)
    pkg = package(tmp_path, key, "2", seed=2)
    manifest = json.loads((pkg / MANIFEST).read_text())
    gguf = (pkg / manifest["file"]).read_bytes()
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    agent = rig.agent(ota_config(rig, public, probation_requests=15,
                                 probation_latency_factor=20.0))
    agent.wait_for_event("agent_ready")
    agent.wait_for_event("model_commands_subscribed")
    sensors = Sensors(rig.local.port, 0.05)
    sensors.start()
    with FileServer(Served(gguf, mode="reset_once")) as server:
        try:
            wait_until(lambda: len(collector.distinct_ids()) >= 10, 60, "results before")
            payload = json.dumps({"manifest": manifest,
                                  "signature": (pkg / SIGNATURE).read_text().strip(),
                                  "url": server.url("tiny-ota-2.gguf")}).encode()
            sent_at = time.monotonic()
            publish_readings(rig.cloud.port, [("edge/gw-test/cmd/model", payload)],
                             client_id="operator")
            wait_until(lambda: "committed" in steps(agent.events())
                       or "rolled_back" in steps(agent.events())
                       or "download_failed" in steps(agent.events()), 120, "the verdict")
            committed_s = time.monotonic() - sent_at
            at_verdict = sensors.sent
            wait_until(lambda: len(collector.distinct_ids()) >= at_verdict + 5, 60,
                       "results after the swap")
        finally:
            sensors.stop.set()
            sensors.join(10)
    told = steps(agent.events())
    assert told[-1] == "committed", told
    for step in ("command_accepted", "download_started", "downloaded", "received", "verified",
                 "canary_passed", "switched", "committed"):
        assert step in told, step
    # The first connection was reset mid-file; the second asked for the rest with Range.
    ranges = [r["range"] for r in server.served.requests]
    assert ranges[0] is None
    assert len(ranges) == 2
    assert str(ranges[1]).startswith("bytes=")
    downloaded = next(e for e in agent.events() if e.get("step") == "downloaded")
    try:
        wait_until(lambda: len(collector.distinct_ids()) == sensors.sent, 60, "every result")
    finally:
        seen = {r["source"]["payload"]["seq"] for r in collector.results()}
        print(f"published={sensors.sent} results={len(seen)} "
              f"missing={sorted(set(range(sensors.sent)) - seen)[:10]}")
    results = collector.results()
    assert all(r["status"] == "ok" for r in results)
    versions = [r["model"]["version"] for r in results]
    assert "2" in versions
    cloud_steps = [b["step"] for t, b in collector.messages if t.endswith("events/model")]
    assert "downloaded" in cloud_steps
    assert "committed" in cloud_steps
    print(f"command to committed: {committed_s:.2f} s; download {downloaded['figures']}; "
          f"readings={sensors.sent} ok={len(results)} v2={versions.count('2')}")
    collector.stop()
