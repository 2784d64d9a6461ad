"""Labelled examples: where they come from (a JSONL file of {"reading", "output"} lines, or a
labelling rule), the held-out split, and the eval.jsonl written beside the model.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.base.validation import check_output
from agent.config.settings import Route
from agent.specialize.rules import (
    Rule,
    synthetic_reading,
    synthetic_value,
    topic_for,
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

    def to_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "reading": self.reading, "output": self.output}


def from_rule(route: Route, rule: Rule, *, span: tuple[float, float], n_train: int,
              n_eval: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, evaluation) examples labelled by `rule`; no training example is one of the
    evaluation examples (same topic and payload)."""
    if span[0] >= span[1]:
        raise ValueError(f"range {span[0]:g}:{span[1]:g} is empty")
    held = _draw(route, rule, span, n_eval, random.Random(f"eval-{seed}"), avoid=set())
    seen = {(e.topic, e.payload) for e in held}
    train = _draw(route, rule, span, n_train, random.Random(f"train-{seed}"), avoid=seen)
    return train, held


def _draw(route: Route, rule: Rule, span: tuple[float, float], n: int, rng: random.Random,
          avoid: set[tuple[str, str]]) -> list[Example]:
    out: list[Example] = []
    while len(out) < n:
        value = synthetic_value(rng, rule, span)
        sensor, reading = synthetic_reading(rng, rule.field, value, seq=rng.randint(0, 99_999))
        example = Example(topic_for(route, sensor), reading, rule.label(reading))
        if (example.topic, example.payload) not in avoid:
            out.append(example)
    return out


def load_labels(path: Path, route: Route) -> list[Example]:
    """The examples of a labels file: one {"reading": {...}, "output": {...}} per line, with an
    optional "topic" (default: the route's first filter, wildcards filled with "sensor-1").
    A bad line is an error naming the file, the line and the problem."""
    examples: list[Example] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{where}: not JSON: {exc}") from exc
            if not isinstance(item, dict) or not isinstance(item.get("reading"), dict):
                raise ValueError(f'{where}: expected {{"reading": {{...}}, "output": {{...}}}}')
            output = item.get("output")
            if not isinstance(output, dict):
                raise ValueError(f"{where}: output must be a JSON object, got {output!r}")
            if route.output_schema is not None:
                _, problem = check_output(json.dumps(output), route.output_schema)
                if problem:
                    raise ValueError(f"{where}: output {output!r}: {problem}")
            topic = item.get("topic", topic_for(route, "sensor-1"))
            if not isinstance(topic, str):
                raise ValueError(f"{where}: topic must be a string")
            examples.append(Example(topic, item["reading"], output))
    if not examples:
        raise ValueError(f"{path}: no labelled examples")
    return examples


def split(examples: list[Example], n_eval: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, evaluation): a seeded sample of min(n_eval, a fifth) for evaluation; training
    lines whose payload an evaluation line has are dropped."""
    n_eval = min(n_eval, max(1, len(examples) // 5))
    order = list(range(len(examples)))
    random.Random(f"split-{seed}").shuffle(order)
    held = [examples[i] for i in order[:n_eval]]
    seen = {(e.topic, e.payload) for e in held}
    train = [examples[i] for i in order[n_eval:] if (examples[i].topic, examples[i].payload)
             not in seen]
    if not train:
        raise ValueError(f"only {len(examples)} labelled examples: none left to train on")
    return train, held


def write_jsonl(path: Path, examples: list[Example]) -> None:
    path.write_text("".join(json.dumps(e.to_json()) + "\n" for e in examples), encoding="utf-8")


def read_jsonl(path: Path) -> list[Example]:
    """Examples written by write_jsonl (eval.jsonl)."""
    return [Example(item["topic"], item["reading"], item["output"])
            for item in (json.loads(line) for line in path.read_text().splitlines() if line)]
