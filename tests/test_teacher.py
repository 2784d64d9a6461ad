"""Knowledge distillation on a real teacher: llama-cpp-python's OpenAI-compatible server
(`python -m llama_cpp.server`) serving the tiny generated GGUF labels readings for
`edge-agent model specialize --teacher`. The tiny model's labels are random, but the server
constrains them to the route's schema: these tests check the mechanism (every reading asked
once, every kept label schema-valid, unusable answers dropped and counted, the labels file read
back by --labels, a dead or refusing teacher named in the error), not the labels' quality."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.base.validation import check_output
from agent.cli.main import main
from agent.config.settings import Route
from agent.specialize import teacher
from agent.specialize.examples import load_labels
from tests.harness import TEST_ROUTES, LlamaServer, free_port

SCHEMA = {"type": "object", "required": ["level"], "additionalProperties": False,
          "properties": {"level": {"enum": ["normal", "warning", "critical"]}}}


def route(max_tokens: int = 24) -> Route:
    return Route(name="temperature", topics=["sensors/+/temperature"],
                 instruction="Classify the temperature reading as normal, warning or critical.",
                 max_tokens=max_tokens, output_schema=SCHEMA)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[LlamaServer]:
    cloud = LlamaServer(tiny_model, tmp_path_factory.mktemp("teacher"))
    try:
        yield cloud.start()
    finally:
        if cloud.proc is not None and cloud.running:
            os.kill(cloud.proc.pid, signal.SIGCONT)
        cloud.kill()


def teacher_of(server: LlamaServer, tmp_path: Path, **extra: object) -> teacher.Teacher:
    key = tmp_path / "teacher.key"
    key.write_text(server.api_key + "\n")
    return teacher.Teacher(url=server.base_url, model=server.alias, key_file=key,
                           response_format="json_object", timeout_s=30,
                           **extra)  # type: ignore[arg-type]


def quiet(_: str) -> None:
    pass


def test_the_teacher_labels_every_synthetic_reading_once_with_schema_valid_outputs(
    server: LlamaServer, tmp_path: Path
) -> None:
    """24 synthetic readings of --range: each is one request to the teacher; every label kept
    satisfies the route's schema and its reading is the one asked about; the kept and the
    dropped add up to the readings; the labels file written beside the model is what
    load_labels reads back."""
    lines: list[str] = []
    before = server.requests()
    examples, source = teacher.labels(teacher_of(server, tmp_path, field="celsius"), route(),
                                      tmp_path / "out", span=(0.0, 150.0), n=24, seed=3,
                                      say=lines.append)
    assert server.requests() - before == 24
    asked = teacher.synthetic(route(), "celsius", (0.0, 150.0), 24, 3)
    assert len(examples) + sum(source["dropped"].values()) == 24
    assert len(examples) >= 12  # 24 tokens hold any of the three answers
    for example in examples:
        assert check_output(json.dumps(example.output), SCHEMA)[1] is None
        assert teacher.Unlabelled(example.topic, example.reading) in asked
    assert source["teacher_answered_as"] == server.alias
    assert source["lines"] == len(examples)
    assert source["range"] == [0.0, 150.0]
    assert lines[-2].startswith(f"teacher: {len(examples)} of 24 readings labelled in ")
    assert any(line.startswith("teacher: 24/24 answered, ") and line.endswith("/s")
               for line in lines)
    assert load_labels(tmp_path / "out" / teacher.LABELS_FILE, route()) == examples


def test_the_synthetic_field_defaults_to_the_input_schemas_one_number() -> None:
    schema = {"type": "object", "properties": {"sensor": {"type": "string"},
                                               "celsius": {"type": "number"}}}
    assert teacher.reading_field(route().model_copy(update={"input_schema": schema}),
                                 None) == "celsius"
    assert teacher.reading_field(route(), "bar") == "bar"
    with pytest.raises(ValueError, match=r"give --field NAME .* names 0 numeric properties"):
        teacher.reading_field(route(), None)


def test_a_readings_file_is_labelled_in_its_order_and_its_outputs_are_ignored(
    server: LlamaServer, tmp_path: Path
) -> None:
    """A --readings file (a `queue export` file's shape: topic, reading, an output to be
    replaced, provenance) is labelled line by line; a line without a topic gets the route's."""
    readings = tmp_path / "readings.jsonl"
    readings.write_text("".join(json.dumps(line) + "\n" for line in [
        {"topic": "sensors/oven-3/temperature", "reading": {"celsius": 91},
         "output": {"level": "normal"}, "id": "x1", "model": {"name": "old"}},
        {"reading": {"celsius": 12.5}},
        {"topic": "sensors/kiln-1/temperature", "reading": {"sensor": "kiln-1", "celsius": 60}},
    ]))
    examples, source = teacher.labels(teacher_of(server, tmp_path, readings=readings), route(),
                                      tmp_path / "out", span=None, n=999, seed=0, say=quiet)
    assert source["readings"] == 3
    assert source["readings_file"] == str(readings)
    assert [(e.topic, e.reading) for e in examples] == [
        ("sensors/oven-3/temperature", {"celsius": 91}),
        ("sensors/sensor-1/temperature", {"celsius": 12.5}),
        ("sensors/kiln-1/temperature", {"sensor": "kiln-1", "celsius": 60}),
    ]
    assert all(check_output(json.dumps(e.output), SCHEMA)[1] is None for e in examples)


def test_answers_that_cannot_be_complete_json_are_dropped_and_counted(
    server: LlamaServer, tmp_path: Path
) -> None:
    """With max_tokens 3 no answer can close its JSON object: all 6 are dropped as not strict
    JSON, and the run stops saying so and naming the teacher."""
    with pytest.raises(teacher.TeacherFailed) as failed:
        teacher.label(teacher_of(server, tmp_path), route(max_tokens=3),
                      teacher.synthetic(route(), "celsius", (0.0, 100.0), 6, 0), say=quiet)
    assert str(failed.value) == (f"teacher {server.base_url}: none of 6 answers was usable: "
                                 "6 answer not strict JSON")


def test_a_dead_teacher_is_an_error_naming_its_url(tmp_path: Path) -> None:
    """Nothing listens at the URL: each request is tried 3 times, then the run stops with the
    URL and the cause."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    readings = teacher.synthetic(route(), "celsius", (0.0, 100.0), 5, 0)
    with pytest.raises(teacher.TeacherFailed) as failed:
        teacher.label(teacher.Teacher(url=url, concurrency=2), route(), readings, say=quiet)
    assert str(failed.value).startswith(f"teacher {url}: unreachable (cloud unreachable: "
                                        "ConnectError) after 3 tries")


def test_a_teacher_refusing_every_request_stops_the_run_early(
    server: LlamaServer, tmp_path: Path
) -> None:
    """A wrong API key: the first 8 requests (twice the concurrency) are all refused with HTTP
    401, and the run stops there rather than asking about all 40 readings."""
    key = tmp_path / "wrong.key"
    key.write_text("not-the-key")
    spec = teacher.Teacher(url=server.base_url, key_file=key, response_format="json_object")
    before = server.requests()
    with pytest.raises(teacher.TeacherFailed) as failed:
        teacher.label(spec, route(), teacher.synthetic(route(), "celsius", (0.0, 100.0), 40, 0),
                      say=quiet)
    assert str(failed.value).startswith(f"teacher {server.base_url}: the first 8 requests were "
                                        "all refused: cloud error HTTP 401")
    assert server.requests() - before < 40


def test_the_command_line_refuses_teacher_options_without_a_teacher_and_a_bad_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before the [train] extra is looked for, so they hold without torch too."""
    base = ["model", "specialize", "--config", "c.toml", "--route", "t", "--out", "o"]
    assert main([*base, "--rule", "x<1:a,else:b", "--readings", "r.jsonl"]) == 1
    assert "--readings only go with --teacher URL" in capsys.readouterr().err
    assert main([*base, "--teacher", "gpu-box:8000", "--range", "0:1"]) == 1
    assert "--teacher 'gpu-box:8000' is not an http:// or https:// URL" in capsys.readouterr().err
    assert main([*base, "--teacher", "http://h/v1", "--readings", "r", "--range", "0:1"]) == 1
    assert "give one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--labels", "l.jsonl", "--teacher", "http://h/v1"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_specialize_trains_on_the_teachers_labels(server: LlamaServer, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`edge-agent model specialize --teacher URL --range LO:HI`: the teacher's labels go the
    way of a labels file (split, training, evaluation) and recipe.json records the teacher."""
    pytest.importorskip("torch", reason="training needs the [train] extra (torch); the "
                        "labelling itself is tested above without it")
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[agent]
device_id = "gw"
state_dir = "{tmp_path / 'state'}"
[model]
path = "model.gguf"
n_threads = 1
{TEST_ROUTES}""")
    key = tmp_path / "teacher.key"
    key.write_text(server.api_key)
    out = tmp_path / "student"
    assert main(["model", "specialize", "--config", str(config), "--route", "temperature",
                 "--teacher", server.base_url, "--teacher-model", server.alias,
                 "--teacher-key-file", str(key), "--teacher-format", "json_object",
                 "--range", "0:150", "--field", "celsius", "--train-examples", "40",
                 "--eval-examples", "8", "--steps", "5", "--out", str(out)]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["labels"]["teacher"] == server.base_url
    assert recipe["labels"]["readings"] == 48
    labelled = load_labels(out / teacher.LABELS_FILE, route())
    assert len(labelled) == recipe["labels"]["lines"]
    assert "teacher: 48/48 answered" in capsys.readouterr().out


def test_a_windowed_route_is_refused_before_the_teacher_is_asked(tmp_path: Path) -> None:
    """The teacher labels single readings; a route of windows would learn prompts the agent
    never sends. Nothing listens at the URL: the refusal must come first."""
    from agent.specialize.run import Request, find_route, labelled

    config = Path(__file__).resolve().parent.parent / "configs" / "agent.toml"
    _, wear = find_route(config, "wear")
    url = f"http://127.0.0.1:{free_port()}/v1"
    request = Request(config=config, route="wear", out=tmp_path,
                      teacher=teacher.Teacher(url=url))
    with pytest.raises(ValueError, match=r"route wear answers windows of readings"):
        labelled(request, wear, say=quiet)
