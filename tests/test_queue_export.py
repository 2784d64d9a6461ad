"""`edge-agent queue export`: a route's stored results become a labels file that
`edge-agent model specialize --labels` reads, on real SQLite stores: one filled through the
store's own writer with the agent's own result bodies, and ones filled by the running agent
(real mosquitto, real llama.cpp), exported while it runs: with the cloud down (the backlog)
and with the cloud up (every result delivered: the history of answered readings)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.base.records import Answer, Completion, DeadLetter, ModelInfo, Reading
from agent.cli.export import parse_since, stored_answers
from agent.cli.main import main
from agent.config.settings import StoreSection, load
from agent.routing.outbound import Topics, dead_letter_row, result_row
from agent.routing.windows import window_result_row
from agent.specialize.examples import load_labels
from agent.specialize.teacher import load_readings
from agent.store.views import AnsweredReading, read_counts, read_route
from agent.store.writer import Store
from tests.conftest import Rig
from tests.harness import CloudCollector, publish_readings, wait_until

MODEL = ModelInfo(name="tiny-test", version="3", sha256="ab" * 32, path="/m.gguf")
TOPICS = Topics("edge", "gw-test")


def answer(output: object, error: str | None = None) -> Answer:
    return Answer(output=output, error=error,
                  completion=Completion(json.dumps(output), 20, 6, "stop", 12.5),
                  model=MODEL, raw=None if error is None else "{bad", executor="local",
                  executor_reason=None)


def reading(i: int, payload: bytes, topic: str = "sensors/oven-1/temperature",
            route: str = "temperature") -> Reading:
    return Reading(f"id{i}", topic, payload, 1_700_000_000.0 + i, route, 0)


def config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f"""
[agent]
device_id = "gw-test"
state_dir = "{tmp_path / 'state'}"
[model]
path = "model.gguf"
[[routes]]
name = "temperature"
topics = ["sensors/+/temperature"]
instruction = "Classify the temperature reading as normal, warning or critical."
[routes.output_schema]
type = "object"
required = ["level"]
additionalProperties = false
[routes.output_schema.properties.level]
enum = ["normal", "warning", "critical"]
[[routes]]
name = "other"
topics = ["other/#"]
instruction = "Summarize."
""")
    return path


def fill(store_path: Path) -> None:
    """Through the store's writer, as the pipeline records them: 5 good results of the
    route, one failed, one window result, one non-object reading, one output the schema now
    refuses, one result of another route, a dead letter on the route's topics and one
    elsewhere, and a reading still waiting in the inbox."""

    async def scenario() -> None:
        store = await Store.open(store_path)
        levels = ["normal", "warning", "critical", "normal", "warning"]
        cases: list[tuple[Reading, object, Answer]] = [
            (reading(i, json.dumps({"celsius": 50 + 10 * i}).encode()),
             {"celsius": 50 + 10 * i}, answer({"level": level}))
            for i, level in enumerate(levels)]
        cases.append((reading(5, b'{"celsius": 99}'), {"celsius": 99},
                      answer(None, error="output fails the schema")))
        cases.append((reading(6, b"42"), 42, answer({"level": "normal"})))
        cases.append((reading(7, b'{"celsius": 1}'), {"celsius": 1},
                      answer({"level": "freezing"})))
        cases.append((reading(8, b'{"x": 1}', topic="other/a", route="other"), {"x": 1},
                      answer({"summary": "x"})))
        await store.ingest([r for r, _, _ in cases], [])
        by_id = {r.id: (source, a) for r, source, a in cases}
        for _ in cases:
            leased = await store.lease()
            assert leased is not None
            source, a = by_id[leased.id]
            await store.complete(leased.id, result_row(TOPICS, leased, source, a, "v1"))
        window = [reading(10, b'{"celsius": 70}'), reading(11, b'{"celsius": 71}')]
        await store.ingest(window, [])
        leased_window = [await store.lease(), await store.lease()]
        assert all(leased_window)
        await store.complete_window([r.id for r in window],
                                    window_result_row(TOPICS, window,
                                                      answer({"level": "warning"}), "v1"))
        for n, topic in enumerate(("sensors/oven-2/temperature", "other/b")):
            letter = DeadLetter(f"dead{n}", topic, b"not json", "not JSON", 1.0)
            await store.dead_letter_reading(letter, dead_letter_row(TOPICS, letter))
        await store.ingest([reading(20, b'{"celsius": 61}')], [])
        await store.close()

    asyncio.run(scenario())


def test_export_writes_the_routes_good_results_as_labels_that_specialize_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Of the route's stored results, the five good ones are written (topic, reading, output,
    with id and model provenance) in store order; failed, window, non-object and
    schema-refused results are counted as skipped, a dead letter on the route's topics and a
    waiting reading are counted as not exported; load_labels reads the file back unchanged."""
    cfg = config(tmp_path)
    settings = load(cfg)
    fill(settings.store_path)
    capsys.readouterr()  # the writer's own log lines
    out = tmp_path / "labels.jsonl"
    assert main(["queue", "export", "--route", "temperature", "--config", str(cfg),
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["reading"] for line in lines] == [{"celsius": 50 + 10 * i} for i in range(5)]
    assert [line["output"]["level"] for line in lines] == [
        "normal", "warning", "critical", "normal", "warning"]
    assert {line["topic"] for line in lines} == {"sensors/oven-1/temperature"}
    assert (lines[0]["id"], lines[0]["received_at"]) == ("id0", 1_700_000_000.0)
    assert lines[0]["model"] == {"name": "tiny-test", "version": "3", "executor": "local"}
    assert ("route temperature: 5 results exported to " + str(out)) in err
    assert ("4 skipped (1 failed results, 1 outputs the route's output_schema refuses, "
            "1 readings not a JSON object, 1 window results)") in err
    assert "1 dead letters on the route's topics, 1 readings waiting in the inbox" in err
    # Each result is in the history and still in the outbox: written once, from the history.
    assert "5 of the results read from the history of answered readings" in err

    route = next(r for r in settings.routes if r.name == "temperature")
    examples = load_labels(out, route)
    assert [e.to_json() for e in examples] == [
        {k: line[k] for k in ("topic", "reading", "output")} for line in lines]
    assert not list(tmp_path.glob(".labels.jsonl.*"))  # no partial file left beside it
    # ... and it is a readings file for a teacher to label again (--teacher --readings).
    assert [(r.topic, r.reading) for r in load_readings(out, route)] == [
        (e.topic, e.reading) for e in examples]


def test_export_to_stdout_and_since_filters_by_when_the_result_was_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --out the lines go to stdout and only the summary to stderr; --since keeps the
    results made at or after that time (a duration or ISO-8601), here none or all."""
    cfg = config(tmp_path)
    fill(load(cfg).store_path)
    capsys.readouterr()  # the writer's own log lines
    assert main(["queue", "--config", str(cfg), "export", "--route", "temperature",
                 "--since", "1h"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 5
    assert all(json.loads(line)["output"] for line in captured.out.splitlines())
    assert "5 results exported to stdout" in captured.err
    assert "queue export" not in captured.out

    later = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 3600))
    assert main(["queue", "export", "--route", "temperature", "--config", str(cfg),
                 "--since", later + "Z"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "0 results exported" in captured.err
    assert "0 dead letters" in captured.err


def test_export_names_a_route_the_configuration_lacks_a_bad_since_and_a_missing_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path)
    args = ["queue", "export", "--config", str(cfg)]
    assert main([*args, "--route", "temperature"]) == 1
    assert "cannot read the store: no store at" in capsys.readouterr().err
    fill(load(cfg).store_path)
    capsys.readouterr()  # the writer's own log lines
    assert main([*args, "--route", "humidity"]) == 1
    assert "no route named 'humidity'; routes: temperature, other" in capsys.readouterr().err
    assert main([*args, "--route", "temperature", "--since", "yesterday"]) == 1
    assert "--since 'yesterday' is neither an ISO-8601 time" in capsys.readouterr().err
    out = tmp_path / "none" / "labels.jsonl"
    assert main([*args, "--route", "temperature", "--out", str(out)]) == 1
    assert "No such file or directory" in capsys.readouterr().err


def test_parse_since_reads_durations_and_iso_times_as_utc_unless_they_say() -> None:
    now = 1_800_000_000.0
    assert parse_since("24h", now) == now - 86400
    assert parse_since("90s", now) == now - 90
    assert parse_since("1.5d", now) == now - 1.5 * 86400
    assert parse_since("2027-01-15T08:00:00") == parse_since("2027-01-15T08:00:00Z")
    assert parse_since("2027-01-15T09:00:00+01:00") == parse_since("2027-01-15T08:00:00Z")


def test_export_of_a_running_agents_backlog_round_trips_through_load_labels(rig: Rig) -> None:
    """The agent answers readings with llama.cpp while the cloud broker is down, so the results
    stay in its outbox; exported while it keeps running (and keeps answering more), every line
    is one of the published readings with a schema-valid answer, and load_labels reads the file."""
    rig.local.start()
    agent = rig.agent()
    agent.wait_for_event("agent_ready")
    sent = [(f"sensors/s{i % 3}/temperature",
             json.dumps({"seq": i, "celsius": 20 + 7 * i}).encode()) for i in range(12)]
    publish_readings(rig.local.port, sent[:8])
    wait_until(lambda: read_counts(rig.store)["outbox"] >= 8, 120, "8 results in the outbox")
    publish_readings(rig.local.port, sent[8:])  # answered while the export reads
    out = rig.workdir / "labels.jsonl"
    assert main(["queue", "export", "--route", "temperature", "--config",
                 str(rig.workdir / "agent.toml"), "--out", str(out)]) == 0
    assert agent.proc is not None
    assert agent.proc.poll() is None  # still running
    route = load(rig.workdir / "agent.toml").routes[0]
    examples = load_labels(out, route)
    published = {(topic, json.loads(payload)["seq"]) for topic, payload in sent}
    assert 8 <= len(examples) <= 12
    assert all((e.topic, e.reading["seq"]) in published for e in examples)
    assert all(e.output["level"] in ("normal", "warning", "critical") for e in examples)
    conn = sqlite3.connect(f"file:{rig.store}?mode=ro", uri=True)
    try:  # every exported line is a result row of the store, by id
        ids = {row[0] for row in conn.execute("SELECT id FROM outbox WHERE kind = 'result'")}
    finally:
        conn.close()
    assert {json.loads(line)["id"] for line in out.read_text().splitlines()} <= ids


def deliver_everything(store_path: Path) -> None:
    async def scenario() -> None:
        store = await Store.open(store_path)
        while rows := await store.pending_outbox(100):
            await store.mark_delivered([row.seq for row in rows])
        await store.close()

    asyncio.run(scenario())


def test_delivered_results_export_from_the_history_merged_with_the_outbox_oldest_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three results made without a history (history_max_rows 0: outbox only) and three with
    it, of which the cloud then has the first (delivered, gone from the outbox); export gives
    the six in the order they were made, each once; after every result is delivered, the three
    the history holds; --since applies to both."""
    cfg = config(tmp_path)
    settings = load(cfg)

    async def answer_some(bounds: StoreSection, ids: range) -> None:
        store = await Store.open(settings.store_path, bounds)
        for i in ids:
            r = reading(i, json.dumps({"celsius": 50 + i}).encode())
            await store.ingest([r], [])
            leased = await store.lease()
            assert leased is not None
            await store.complete(leased.id, result_row(
                TOPICS, leased, {"celsius": 50 + i}, answer({"level": "normal"}), "v1"))
            await asyncio.sleep(0.01)  # distinct creation times
        await store.close()

    asyncio.run(answer_some(StoreSection(history_max_rows=0), range(3)))
    asyncio.run(answer_some(StoreSection(), range(3, 6)))

    async def deliver_first_of_history() -> None:
        store = await Store.open(settings.store_path)
        row = next(r for r in await store.pending_outbox(10) if r.id == "id3")
        await store.mark_delivered([row.seq])
        await store.close()

    asyncio.run(deliver_first_of_history())
    capsys.readouterr()
    args = ["queue", "export", "--route", "temperature", "--config", str(cfg)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["id"] for line in captured.out.splitlines()] == [
        f"id{i}" for i in range(6)]
    assert "6 results exported to stdout" in captured.err
    assert "3 of the results read from the history" in captured.err

    deliver_everything(settings.store_path)
    capsys.readouterr()
    assert main(args) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [
        "id3", "id4", "id5"]

    conn = sqlite3.connect(settings.store_path)
    with conn:  # id3 and id4 made two hours ago
        conn.execute("UPDATE history SET created_at = created_at - 7200 "
                     "WHERE id IN ('id3', 'id4')")
    conn.close()
    assert main([*args, "--since", "1h"]) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == ["id5"]


def test_a_history_row_pruned_between_the_two_reads_is_still_written_once(
    tmp_path: Path,
) -> None:
    """The history is read, then the agent prunes it (here: every row) before the outbox is
    read, so the outbox no longer leaves those results to the history: each is still given
    once, by its id and its creation time, the same in both tables."""
    cfg = config(tmp_path)
    settings = load(cfg)
    fill(settings.store_path)
    route = next(r for r in settings.routes if r.name == "temperature")
    with read_route(settings.store_path) as reader:
        read_history = reader.history

        def history_then_prune(name: str, since: float | None) -> Iterator[AnsweredReading]:
            rows = list(read_history(name, since))
            conn = sqlite3.connect(settings.store_path)
            with conn:
                conn.execute("DELETE FROM history")
            conn.close()
            yield from rows

        reader.history = history_then_prune  # type: ignore[method-assign]
        items = list(stored_answers(reader, route, None))
    ids = [item.id for item in items]
    assert sorted(ids) == sorted(set(ids))
    assert len([i for i in items if isinstance(i, AnsweredReading)]) == 7  # 5 good, 42, freezing
    assert len(ids) == 9  # and the failed result and the window's, from the outbox


def test_export_of_a_connected_agent_returns_the_results_the_cloud_already_has(
    rig: Rig,
) -> None:
    """The cloud broker is up, so the agent delivers every result and its outbox empties; the
    export still gives one line per answered reading (the history), each the reading the
    cloud saw with the answer it received."""
    rig.local.start()
    rig.cloud.start()
    collector = CloudCollector(rig.cloud.port).start()
    agent = rig.agent()
    agent.wait_for_event("agent_ready")
    sent = [(f"sensors/s{i % 3}/temperature",
             json.dumps({"seq": i, "celsius": 20 + 7 * i}).encode()) for i in range(10)]
    publish_readings(rig.local.port, sent)
    wait_until(lambda: len(collector.results()) >= 10, 120, "10 results at the cloud")
    wait_until(lambda: read_counts(rig.store)["outbox"] == 0
               and read_counts(rig.store)["delivered"] >= 10, 30, "the outbox drained")
    out = rig.workdir / "labels.jsonl"
    assert main(["queue", "export", "--route", "temperature", "--config",
                 str(rig.workdir / "agent.toml"), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    at_cloud = {r["id"]: r for r in collector.results()}
    assert len(lines) == 10
    assert sorted(line["reading"]["seq"] for line in lines) == list(range(10))
    for line in lines:
        result = at_cloud[line["id"]]
        assert line["reading"] == result["source"]["payload"]
        assert line["topic"] == result["source"]["topic"]
        assert line["output"] == result["output"]
        assert line["model"] == {"name": result["model"]["name"],
                                 "version": result["model"]["version"],
                                 "executor": result["executor"]}
    route = load(rig.workdir / "agent.toml").routes[0]
    assert len(load_labels(out, route)) == 10
    collector.stop()
