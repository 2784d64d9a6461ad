"""Secrets never show: not in the log, not in the process's argv, not in configuration errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import Rig
from tests.harness import AgentProcess, publish_readings, wait_until

SECRET = "pa55-w0rd-7f3c91"


def test_a_broker_password_from_the_environment_never_reaches_logs_argv_or_errors(
    rig: Rig,
) -> None:
    """The cloud broker password comes from EDGE_AGENT_CLOUD_BROKER__PASSWORD while the cloud
    is down (so connection errors are logged) and readings flow: the secret is in none of the
    agent's output, nor its worker's, nor either command line; a configuration error elsewhere
    in the file does not echo it either."""
    rig.local.start()
    config = rig.config()
    config.write_text(config.read_text().replace(
        "[cloud_broker]\n", '[cloud_broker]\nusername = "gw"\n'))
    agent = AgentProcess(config, rig.workdir / "agent.log",
                         env={"EDGE_AGENT_CLOUD_BROKER__PASSWORD": SECRET})
    rig.agents.append(agent)
    agent.start()
    agent.wait_for_event("agent_ready")
    publish_readings(rig.local.port, [("sensors/a/temperature", b'{"seq": 1}')])
    agent.wait_for_event("uplink_link_failed", 30)
    wait_until(lambda: any(e.get("event") == "ingest_batch_committed" for e in agent.events()),
               30, "a reading ingested")
    assert agent.proc is not None
    worker_pid = int(agent.wait_for_event("worker_ready")["pid"])
    for pid in (agent.proc.pid, worker_pid):
        assert SECRET not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert agent.terminate() == 0
    assert SECRET not in agent.log_path.read_text()

    config.write_text(config.read_text() + '\n[store]\nwhen_full = "sometimes"\n')
    proc = subprocess.run([sys.executable, "-m", "agent", "check-config", str(config)],
                          capture_output=True, text=True, timeout=60,
                          env={"EDGE_AGENT_CLOUD_BROKER__PASSWORD": SECRET, "PATH": "/usr/bin"})
    assert proc.returncode == 78
    assert "store.when_full" in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout
