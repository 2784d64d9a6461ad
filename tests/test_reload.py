"""SIGHUP reloads routes and limits in a running agent; what needs a restart is named by key."""

from __future__ import annotations

import json
import signal

from agent.config.reload import changed_keys, is_reloadable, merge
from agent.config.settings import load
from tests.conftest import Rig
from tests.harness import CloudCollector, publish_readings, wait_until
from tests.test_service import NotifyListener, notify, start_agent  # noqa: F401

VIBRATION_ROUTE = """
[[routes]]
name = "vibration"
topics = ["machines/#"]
instruction = "Say whether the vibration reading suggests bearing wear."
max_tokens = 24
[routes.output_schema]
type = "object"
required = ["wear"]
additionalProperties = false
[routes.output_schema.properties.wear]
type = "boolean"
"""


def test_changed_keys_split_into_reloadable_and_restart(rig: Rig) -> None:
    """A new route and an input limit are reloadable; the model's context size is not, and the
    merged settings keep its running value."""
    before = load(rig.config())
    text = rig.config().read_text()
    path = rig.workdir / "changed.toml"
    path.write_text(text.replace("n_ctx = 512", "n_ctx = 1024")
                    .replace("[local_broker]\n", "[local_broker]\nmax_payload_bytes = 999\n")
                    + VIBRATION_ROUTE)
    after = load(path)
    keys = changed_keys(before, after)
    assert keys == ["routes", "local_broker.max_payload_bytes", "model.n_ctx"]
    assert [k for k in keys if is_reloadable(k)] == ["routes", "local_broker.max_payload_bytes"]
    merged = merge(before, after)
    assert [r.name for r in merged.routes] == ["temperature", "vibration"]
    assert merged.local_broker.max_payload_bytes == 999
    assert merged.model.n_ctx == 512, "a restart-only key must keep its running value"


def test_sighup_adds_a_route_live_and_names_what_needs_a_restart(
    rig: Rig, notify: NotifyListener  # noqa: F811
) -> None:
    """A new route takes readings after SIGHUP without a restart (RELOADING=1, then READY=1);
    a changed model key is reported as needing a restart; a bad file on reload is refused by
    key and the agent keeps running on its old configuration."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    agent = start_agent(rig, notify)
    agent.wait_for_event("agent_ready")
    config = agent.config
    original = config.read_text()
    config.write_text(original.replace("n_ctx = 512", "n_ctx = 1024") + VIBRATION_ROUTE)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    reloaded = agent.wait_for_event("config_reloaded", 30)
    assert reloaded["applied"] == ["routes"]
    assert reloaded["needs_restart"] == ["model.n_ctx"]
    wait_until(lambda: bool(notify.times("RELOADING=1")), 10, "RELOADING=1")
    reloading_at = notify.times("RELOADING=1")[0]
    wait_until(lambda: any(t > reloading_at for t in notify.times("READY=1")), 10, "READY=1")

    publish_readings(rig.local.port, [("machines/press-7", json.dumps({"mm_s": 7.1}).encode())])
    wait_until(lambda: bool(collector.results()), 60, "a result of the new route")
    [result] = collector.results()
    assert result["route"] == "vibration"
    assert isinstance(result["output"]["wear"], bool)

    config.write_text(original.replace("[model]", "[pipeline]\nmax_attempts = \"lots\"\n[model]"))
    agent.proc.send_signal(signal.SIGHUP)
    refused = agent.wait_for_event("config_reload_refused", 30)
    assert "pipeline.max_attempts" in refused["error"]
    publish_readings(rig.local.port, [("machines/press-8", json.dumps({"mm_s": 2.0}).encode())])
    wait_until(lambda: len(collector.results()) == 2, 60, "the running routes still work")
    collector.stop()

