"""Random payloads through the real ingest: a real agent between real brokers. Every payload is
accounted for, as a result or as a dead letter with a reason, and the agent never falls over."""

from __future__ import annotations

import itertools
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.base.records import reading_id
from tests.conftest import Rig
from tests.harness import CloudCollector, publish_readings, wait_until

MAX_PAYLOAD = 2048

ROUTES = """
[[routes]]
name = "fuzz"
topics = ["sensors/#"]
instruction = "Classify the reading."
max_tokens = 24
[routes.input_schema]
type = "object"
required = ["celsius"]
[routes.input_schema.properties.celsius]
type = "number"
[routes.output_schema]
type = "object"
required = ["level"]
[routes.output_schema.properties.level]
enum = ["normal", "critical"]
"""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=4),
    max_leaves=12,
)
# Valid JSON grammar that breaks when the result is written (issue 12): numbers that overflow a
# double, lone surrogates, NUL, long strings, invalid UTF-8 inside otherwise fine JSON.
poison = st.one_of(
    st.sampled_from([b"1e400", b"-1e400", b"1.8e308", b"-2e308", b"1e999999"]).map(
        lambda n: b'{"celsius": %s}' % n),
    st.integers(0xD800, 0xDFFF).map(lambda c: b'{"celsius": 1, "name": "\\u%04x"}' % c),
    st.integers(0xD800, 0xDFFF).map(lambda c: b'{"\\u%04x": 1, "celsius": 2}' % c),
    st.just(b'{"celsius": 3, "tag": "a\\u0000b"}'),
    st.integers(1, 1900).map(lambda n: b'{"celsius": 4, "s": "%s"}' % (b"x" * n)),
    st.binary(min_size=1, max_size=8).map(lambda junk: b'{"celsius": 5, "s": "' + junk + b'"}'),
)
payloads = st.one_of(
    st.binary(max_size=200),  # mostly not UTF-8 or not JSON
    json_values.map(lambda v: json.dumps(v).encode()),  # NaN/Infinity appear as bare tokens
    st.builds(lambda c, extra: json.dumps({"celsius": c, **extra}).encode(),
              st.floats(allow_nan=False, allow_infinity=False) | st.integers(-100, 200),
              st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
    st.integers(1, 80).map(lambda d: b"[" * d + b"]" * d),  # nesting around the depth limit
    st.integers(10**19, 10**40).map(lambda n: b'{"celsius": %d}' % n),  # huge integers
    st.just(b'{"celsius": 1}' + b" " * MAX_PAYLOAD),  # over the size limit
    poison,
)


def test_random_payloads_each_become_a_result_or_a_dead_letter(rig: Rig) -> None:
    """Hypothesis batches of bad and good payloads (bytes, JSON with NaN, deep nesting, huge
    integers, oversize, schema violations) through mosquitto into the agent: each id shows up
    at the cloud as a result or a dead letter with a reason, never both, never neither."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    config = rig.config(routes=ROUTES)
    config.write_text(config.read_text().replace(
        "[local_broker]\n", f"[local_broker]\nmax_payload_bytes = {MAX_PAYLOAD}\n"))
    agent = rig.agent(config)
    agent.wait_for_event("agent_ready")
    examples = itertools.count()
    totals = {"published": 0, "results": 0, "dead_letters": 0}

    @settings(max_examples=6, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(payloads, min_size=20, max_size=50))
    def feed(batch: list[bytes]) -> None:
        n = next(examples)
        messages = [(f"sensors/fuzz/{n}/{i}", body) for i, body in enumerate(batch)]
        publish_readings(rig.local.port, messages)
        expected = {reading_id("gw-test", topic, body) for topic, body in messages}

        def accounted() -> bool:
            seen = collector.distinct_ids() | collector.distinct_ids("deadletter")
            return expected <= seen

        wait_until(accounted, 120, f"{len(expected)} payloads accounted for")
        results = collector.distinct_ids() & expected
        letters = {d["id"]: d for d in collector.results("deadletter") if d["id"] in expected}
        assert all(d["reason"] for d in letters.values())
        assert not results & set(letters), "a payload was both a result and a dead letter"
        totals["published"] += len(expected)
        totals["results"] += len(results)
        totals["dead_letters"] += len(letters)

    feed()
    assert agent.proc is not None
    assert agent.proc.poll() is None, "the agent fell over"
    # A poison pill that stayed in the inbox would end the agent again at every start.
    assert agent.terminate() == 0
    again = rig.agent(config)
    again.wait_for_event("agent_ready")
    publish_readings(rig.local.port, [("sensors/fuzz/after", b'{"celsius": 21.5}')])
    wait_until(lambda: reading_id("gw-test", "sensors/fuzz/after", b'{"celsius": 21.5}')
               in collector.distinct_ids(), 60, "a reading after the restart answered")
    assert again.proc is not None
    assert again.proc.poll() is None, "the agent fell over after a restart"
    assert "agent_failed" not in (rig.workdir / "agent.log").read_text()
    print(f"fuzz: {totals}")
    assert totals["results"] > 0
    assert totals["dead_letters"] > 0
    collector.stop()
