"""Labelled examples: where they come from (a JSONL file of {"reading", "output"} lines, or a
labelling rule), the held-out split, and the eval.jsonl written beside the model. For a route
that answers windows of readings an example is a window (`WindowExample`, a file's lines
{"window": [{"topic", "reading"}, ...], "output"}) and its prompt is the window's, built by the
pipeline's own build_window_messages.

The evaluation set is never trained on: it is drawn independently of the training set (from a
rule, its own seeded stream; from a file, a seeded sample of the lines), and a training example
whose topic and payload equal an evaluation example's is dropped. Values do recur (a sensor
reads 86 many times; only the sequence number and timestamp differ), as they do on a gateway;
an earlier cut that kept every held-out value out of training removed nearly every integer
near a threshold from it (the near-threshold draws round to a handful of integers), which
measured a gap the recipe made rather than the student. Pure logic and file reads.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.base.records import Reading
from agent.base.validation import check_output
from agent.config.settings import Route
from agent.routing.prompts import build_messages
from agent.routing.windows import build_window_messages
from agent.specialize.rules import (
    Rule,
    WindowRule,
    synthetic_reading,
    synthetic_value,
    synthetic_window,
    synthetic_window_values,
    topic_for,
    window_size,
)


@dataclass(frozen=True, slots=True)
class Example:
    topic: str
    reading: dict[str, Any]
    output: dict[str, Any]

    @property
    def payload(self) -> str:
        """The reading as a sensor publishes it (the agent prompts with the payload's text)."""
        return json.dumps(self.reading)

    @property
    def answer(self) -> str:
        """The output as the model is taught to write it: json.dumps, which the route's
        grammar admits (one space after the colon)."""
        return json.dumps(self.output)

    @property
    def key(self) -> tuple[str, ...]:
        """What makes two examples the same prompt (the held-out set is kept out of training
        by it)."""
        return (self.topic, self.payload)

    @property
    def reading_keys(self) -> list[str]:
        return list(self.reading)

    @property
    def source(self) -> dict[str, Any]:
        """What the model was asked about, as JSON."""
        return {"topic": self.topic, "reading": self.reading}

    def messages(self, route: Route) -> list[dict[str, str]]:
        """The chat messages the agent's pipeline sends for this reading."""
        return build_messages(route, self.topic, self.payload)

    def to_json(self) -> dict[str, Any]:
        return {**self.source, "output": self.output}


@dataclass(frozen=True, slots=True)
class WindowExample:
    """The readings of one window, in window order, and the window's one answer."""

    readings: tuple[tuple[str, dict[str, Any]], ...]  # (topic, reading)
    output: dict[str, Any]

    @property
    def answer(self) -> str:
        return json.dumps(self.output)

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(part for topic, reading in self.readings
                     for part in (topic, json.dumps(reading)))

    @property
    def reading_keys(self) -> list[str]:
        return [k for _, reading in self.readings for k in reading]

    @property
    def source(self) -> dict[str, Any]:
        return {"window": [{"topic": topic, "reading": reading}
                           for topic, reading in self.readings]}

    def messages(self, route: Route) -> list[dict[str, str]]:
        """The chat messages the agent's pipeline sends for this window (its own
        build_window_messages, on readings carrying just the topic and payload it reads)."""
        return build_window_messages(route, [
            Reading(f"r{index}", topic, json.dumps(reading).encode(), 0.0, route.name, 0)
            for index, (topic, reading) in enumerate(self.readings)])

    def to_json(self) -> dict[str, Any]:
        return {**self.source, "output": self.output}


Sample = Example | WindowExample


def from_rule(route: Route, rule: Rule | WindowRule, *, span: tuple[float, float],
              n_train: int, n_eval: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training, evaluation) examples labelled by `rule` (windows for a window rule); no
    training example is one of the evaluation examples (same topics and payloads)."""
    if span[0] >= span[1]:
        raise ValueError(f"range {span[0]:g}:{span[1]:g} is empty")
    draw = _draw_windows if isinstance(rule, WindowRule) else _draw
    held = draw(route, rule, span, n_eval, random.Random(f"eval-{seed}"), set())
    seen = {e.key for e in held}
    train = draw(route, rule, span, n_train, random.Random(f"train-{seed}"), seen)
    return train, held


def _draw(route: Route, rule: Any, span: tuple[float, float], n: int, rng: random.Random,
          avoid: set[tuple[str, ...]]) -> list[Sample]:
    assert isinstance(rule, Rule)
    out: list[Sample] = []
    while len(out) < n:
        value = synthetic_value(rng, rule, span)
        sensor, reading = synthetic_reading(rng, rule.field, value, seq=rng.randint(0, 99_999))
        example = Example(topic_for(route, sensor), reading, rule.label(reading))
        if example.key not in avoid:
            out.append(example)
    return out


def _draw_windows(route: Route, rule: Any, span: tuple[float, float], n: int,
                  rng: random.Random, avoid: set[tuple[str, ...]]) -> list[Sample]:
    assert isinstance(rule, WindowRule)
    out: list[Sample] = []
    while len(out) < n:
        values = synthetic_window_values(rng, rule, span, window_size(rng, route))
        sensor, readings = synthetic_window(rng, rule.field, values)
        topic = topic_for(route, sensor)
        example = WindowExample(tuple((topic, r) for r in readings), rule.label(readings))
        if example.key not in avoid:
            out.append(example)
    return out


def jsonl_items(path: Path) -> Iterator[tuple[str, Any]]:
    """Each non-blank line of a JSONL file as ("FILE:LINE", its JSON value); a line that is not
    JSON is a ValueError naming the file and the line."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{where}: not JSON: {exc}") from exc
            yield where, item


def load_labels(path: Path, route: Route) -> list[Sample]:
    """The examples of a labels file: one {"reading": {...}, "output": {...}} per line, with an
    optional "topic" (default: the route's first filter, wildcards filled with "sensor-1");
    for a windowed route one {"window": [{"topic": ..., "reading": {...}}, ...], "output": ...}
    per window. A bad line is an error naming the file, the line and the problem."""
    examples: list[Sample] = []
    default_topic = topic_for(route, "sensor-1")
    for where, item in jsonl_items(path):
        if route.windowed:
            if not isinstance(item, dict) or not isinstance(item.get("window"), list):
                raise ValueError(
                    f'{where}: route {route.name!r} answers windows of readings: expected '
                    '{"window": [{"topic": ..., "reading": {...}}, ...], "output": {...}}')
            readings = tuple(_window_reading(where, entry, default_topic)
                             for entry in item["window"])
            if not readings:
                raise ValueError(f"{where}: an empty window")
            examples.append(WindowExample(readings, _output(where, item, route)))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("reading"), dict):
            raise ValueError(f'{where}: expected {{"reading": {{...}}, "output": {{...}}}}')
        topic, reading = _window_reading(where, item, default_topic)
        examples.append(Example(topic, reading, _output(where, item, route)))
    if not examples:
        raise ValueError(f"{path}: no labelled examples")
    return examples


def _output(where: str, item: dict[str, Any], route: Route) -> dict[str, Any]:
    output = item.get("output")
    if not isinstance(output, dict):
        raise ValueError(f"{where}: output must be a JSON object, got {output!r}")
    if route.output_schema is not None:
        _, problem = check_output(json.dumps(output), route.output_schema)
        if problem:
            raise ValueError(f"{where}: output {output!r}: {problem}")
    return output


def _window_reading(where: str, entry: Any, default_topic: str) -> tuple[str, dict[str, Any]]:
    """(topic, reading) of {"topic"?: ..., "reading": {...}}."""
    if not isinstance(entry, dict) or not isinstance(entry.get("reading"), dict):
        raise ValueError(f'{where}: expected {{"topic": ..., "reading": {{...}}}}, got {entry!r}')
    topic = entry.get("topic", default_topic)
    if not isinstance(topic, str):
        raise ValueError(f"{where}: topic must be a string")
    return topic, entry["reading"]


def split(examples: Sequence[Sample], n_eval: int, seed: int
          ) -> tuple[list[Sample], list[Sample]]:
    """(training, evaluation): a seeded sample of min(n_eval, a fifth) for evaluation; training
    lines whose topics and payloads an evaluation line has are dropped."""
    n_eval = min(n_eval, max(1, len(examples) // 5))
    order = list(range(len(examples)))
    random.Random(f"split-{seed}").shuffle(order)
    held = [examples[i] for i in order[:n_eval]]
    seen = {e.key for e in held}
    train = [examples[i] for i in order[n_eval:] if examples[i].key not in seen]
    if not train:
        raise ValueError(f"only {len(examples)} labelled examples: none left to train on")
    return train, held


def write_jsonl(path: Path, examples: Sequence[Sample]) -> None:
    path.write_text("".join(json.dumps(e.to_json()) + "\n" for e in examples), encoding="utf-8")


def read_jsonl(path: Path) -> list[Sample]:
    """Examples written by write_jsonl (eval.jsonl)."""
    out: list[Sample] = []
    for item in (json.loads(line) for line in path.read_text().splitlines() if line):
        if "window" in item:
            out.append(WindowExample(tuple((r["topic"], r["reading"]) for r in item["window"]),
                                     item["output"]))
        else:
            out.append(Example(item["topic"], item["reading"], item["output"]))
    return out
