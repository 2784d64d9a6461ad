"""Co-inference through the whole agent: mosquitto brokers, the agent process, a real
llama_cpp.server as the cloud model, the local llama.cpp worker, SQLite."""

from __future__ import annotations

import json
from collections import Counter

from tests.conftest import Rig
from tests.harness import (
    TEST_ROUTES,
    AgentProcess,
    CloudCollector,
    LlamaServer,
    publish_readings,
    wait_until,
)


def readings(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [(f"sensors/s{i % 3}/temperature", json.dumps({"seq": i, "celsius": 40}).encode())
            for i in range(start, start + n)]


def test_cloud_first_route_answers_from_the_cloud_then_locally_when_it_dies(rig: Rig) -> None:
    """Configured from the TOML file and the environment (the key), the agent answers a
    cloud-first route from the cloud model, naming it; after the server is killed, the next
    readings are answered locally with the reason; all 20 reach the cloud broker, and the API key
    is nowhere in the agent's log."""
    server = LlamaServer(rig.model, rig.workdir, api_key="sk-e2e-secret-4711").start()
    try:
        rig.local.start()
        rig.cloud.start()
        collector = CloudCollector(rig.cloud.port).start()
        config = rig.config(
            routes=TEST_ROUTES.replace("max_tokens = 24", 'max_tokens = 24\nexecutor = '
                                       '"cloud-first"'),
            extra=f'[cloud_model]\nbase_url = "{server.base_url}"\nmodel = "{server.alias}"\n'
                  'response_format = "json_object"\ntimeout_s = 5\nfailure_threshold = 2\n'
                  "cooldown_s = 60\n",
        )
        # The server refuses requests without this key, so cloud results prove it was used.
        agent = AgentProcess(config, rig.workdir / "agent.log",
                             env={"EDGE_AGENT_CLOUD_MODEL__API_KEY": server.api_key})
        rig.agents.append(agent)
        agent.start()
        agent.wait_for_event("agent_ready")
        publish_readings(rig.local.port, readings(10))
        wait_until(lambda: len(collector.distinct_ids()) >= 10, 60, "10 cloud results")
        server.kill()
        publish_readings(rig.local.port, readings(10, start=10))
        wait_until(lambda: len(collector.distinct_ids()) >= 20, 60, "20 results")
        by_seq = {r["source"]["payload"]["seq"]: r for r in collector.results()}
        first = [by_seq[i] for i in range(10)]
        second = [by_seq[i] for i in range(10, 20)]
        assert all(r["executor"] == "cloud" and r["model"]["name"] == "cloud-tiny"
                   and "executor_reason" not in r for r in first)
        assert all(r["executor"] == "local" and r["model"]["name"] == "tiny-test"
                   for r in second)
        reasons = Counter(r["executor_reason"] for r in second)
        assert reasons == {"fallback: cloud unreachable": 2, "fallback: cloud circuit open": 8}
        assert all(r["status"] == "ok" for r in first + second)
        assert [e["event"] for e in agent.events()].count("cloud_breaker_opened") == 1
        assert server.api_key not in agent.log_path.read_text()
        collector.stop()
    finally:
        server.kill()
