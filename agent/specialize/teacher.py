"""Knowledge distillation: a larger teacher model labels the readings a student learns from.

    edge-agent model specialize --teacher http://gpu-box:8000/v1 --teacher-model big \\
        --readings readings.jsonl ...        (or: --range 0:150 --field celsius)

The teacher is any OpenAI-compatible chat-completions endpoint, asked through the agent's own
cloud client (agent/inference/cloud.py) exactly as the agent asks its cloud model: the route's
prompt (agent/routing/prompts.py) and its output_schema as the response_format (json_schema, or
json_object with a schema key for llama-cpp-python's server). The readings are a JSONL file of
{"topic", "reading"} lines (any "output" is ignored: a file of `edge-agent queue export` is
one) or synthetic readings of one numeric field drawn uniformly over --range, in the shapes
agent/specialize/rules.py draws for a rule.

An answer that is not strict JSON satisfying the schema (a JSON object, when the route has
none) is dropped and counted, as is a request the teacher refuses (HTTP 4xx, a malformed
reply); the labelled set is what is left. A teacher that cannot be reached (refused connection,
timeout, HTTP 5xx or 429) is asked again twice after a pause; then the run stops with an error
naming the URL, as it does when the first answers are all refusals (a wrong model name or key
would otherwise refuse every reading). Requests run a few at a time (--teacher-concurrency).
The API key is read from a file and goes only into the Authorization header.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

from agent.base.records import Generation
from agent.base.validation import check_output
from agent.config.settings import CloudModelSection, Route
from agent.inference.cloud import CloudError, CloudModel, CloudUnavailable
from agent.routing.prompts import build_messages
from agent.specialize.examples import Example, jsonl_items, write_jsonl
from agent.specialize.rules import synthetic_reading, topic_for

LABELS_FILE = "teacher-labels.jsonl"  # written to the output directory: review, correct, reuse
TRIES = 3  # per reading, while the teacher is unreachable
RETRY_PAUSE_S = 0.5  # doubled after each failed try


class TeacherFailed(ValueError):
    """The teacher cannot label: unreachable, or refusing every request. Names the URL."""


@dataclass(frozen=True, slots=True)
class Teacher:
    url: str
    model: str = ""
    key_file: Path | None = None
    response_format: Literal["json_schema", "json_object"] = "json_schema"
    concurrency: int = 4
    timeout_s: float = 60.0
    readings: Path | None = None  # else synthetic readings of `field` over the request's range
    field: str | None = None

    def section(self) -> CloudModelSection:
        """The [cloud_model] section the agent would have for this endpoint."""
        key: SecretStr | None = None
        if self.key_file is not None:
            try:
                text = self.key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"--teacher-key-file {self.key_file}: {exc.strerror}") from exc
            if not text:
                raise ValueError(f"--teacher-key-file {self.key_file}: empty")
            key = SecretStr(text)
        return CloudModelSection(base_url=self.url, model=self.model, api_key=key,
                                 timeout_s=self.timeout_s,
                                 response_format=self.response_format)

    def describe(self) -> dict[str, Any]:
        """What recipe.json records about the labels (never the key)."""
        return {"teacher": self.url, "teacher_model": self.model,
                "readings_file": str(self.readings) if self.readings else None,
                "field": self.field}


@dataclass(frozen=True, slots=True)
class Unlabelled:
    topic: str
    reading: dict[str, Any]


@dataclass(slots=True)
class Labels:
    examples: list[Example]
    dropped: Counter[str]
    model: str  # the name the teacher answered with
    elapsed_s: float


def load_readings(path: Path, route: Route) -> list[Unlabelled]:
    """The readings of a JSONL file: {"reading": {...}} per line, an optional "topic" (default:
    the route's first filter, wildcards filled with "sensor-1"); any other key is ignored. A bad
    line is an error naming the file and the line."""
    found: list[Unlabelled] = []
    for where, item in jsonl_items(path):
        if not isinstance(item, dict) or not isinstance(item.get("reading"), dict):
            raise ValueError(f'{where}: expected {{"topic": ..., "reading": {{...}}}}')
        topic = item.get("topic", topic_for(route, "sensor-1"))
        if not isinstance(topic, str):
            raise ValueError(f"{where}: topic must be a string")
        found.append(Unlabelled(topic, item["reading"]))
    if not found:
        raise ValueError(f"{path}: no readings")
    return found


def reading_field(route: Route, given: str | None) -> str:
    """The numeric field synthetic readings carry: `given`, else the one number property of
    the route's input_schema."""
    if given is not None:
        return given
    properties = (route.input_schema or {}).get("properties") or {}
    numeric = [name for name, spec in properties.items()
               if isinstance(spec, dict) and spec.get("type") in ("number", "integer")]
    if len(numeric) != 1:
        raise ValueError(f"route {route.name!r}: give --field NAME (the numeric field of the "
                         "synthetic readings); the route's input_schema names "
                         f"{len(numeric)} numeric properties")
    return str(numeric[0])


def synthetic(route: Route, field: str, span: tuple[float, float], n: int,
              seed: int) -> list[Unlabelled]:
    """`n` distinct readings of `field`, uniform over `span` at 0, 1 or 2 decimals."""
    if span[0] >= span[1]:
        raise ValueError(f"range {span[0]:g}:{span[1]:g} is empty")
    rng = random.Random(f"teacher-{seed}")
    found: list[Unlabelled] = []
    seen: set[tuple[str, str]] = set()
    while len(found) < n:
        decimals = rng.choice((0, 1, 2))
        x = rng.uniform(*span)
        value = round(x) if decimals == 0 else round(x, decimals)
        sensor, reading = synthetic_reading(rng, field, value, seq=rng.randint(0, 99_999))
        item = Unlabelled(topic_for(route, sensor), reading)
        key = (item.topic, json.dumps(reading))
        if key not in seen:
            seen.add(key)
            found.append(item)
    return found


def labels(teacher: Teacher, route: Route, out: Path, *, span: tuple[float, float] | None,
           n: int, seed: int, say: Callable[[str], None] = print
           ) -> tuple[list[Example], dict[str, Any]]:
    """The teacher's labels of its readings (a file, or `n` synthetic ones over `span`), also
    written to `out`/teacher-labels.jsonl, a labels file to review, correct and reuse with
    --labels; and what recipe.json records about them."""
    if teacher.readings is not None:
        readings = load_readings(teacher.readings, route)
    elif span is not None:
        readings = synthetic(route, reading_field(route, teacher.field), span, n, seed)
    else:
        raise ValueError("--teacher needs the readings to label: --readings FILE, or "
                         "--range LO:HI for synthetic ones")
    answered = label(teacher, route, readings, seed=seed, say=say)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / LABELS_FILE, answered.examples)
    say(f"teacher labels written to {out / LABELS_FILE}")
    return answered.examples, teacher.describe() | {
        "teacher_answered_as": answered.model, "readings": len(readings),
        "lines": len(answered.examples), "dropped": dict(answered.dropped),
        "range": list(span) if teacher.readings is None and span is not None else None}


def label(teacher: Teacher, route: Route, readings: list[Unlabelled], *, seed: int = 0,
          say: Callable[[str], None] = print) -> Labels:
    """Ask the teacher for every reading's output (blocking; the command line's). The key file
    is read here, before the event loop starts."""
    return asyncio.run(label_async(teacher, teacher.section(), route, readings, seed=seed,
                                   say=say))


async def label_async(teacher: Teacher, section: CloudModelSection, route: Route,
                      readings: list[Unlabelled], *, seed: int = 0,
                      say: Callable[[str], None] = print) -> Labels:
    """The labelled examples in the readings' order (dropped ones left out), and why the others
    were dropped. TeacherFailed when the teacher cannot be reached or refuses everything.
    `section` is teacher.section(), read off the loop (it may read the key file)."""
    client = CloudModel(section)
    generation = Generation(route.max_tokens, 0.0, seed, route.output_schema)
    answers: list[Example | None] = [None] * len(readings)
    dropped: Counter[str] = Counter()
    names: Counter[str] = Counter()
    done = 0
    started = time.monotonic()
    last_said = started
    every = max(1, len(readings) // 20)
    pending = iter(range(len(readings)))
    say(f"teacher {teacher.url}: labelling {len(readings)} readings, "
        f"{teacher.concurrency} at a time")

    async def ask(item: Unlabelled) -> str:
        messages = build_messages(route, item.topic, json.dumps(item.reading))
        pause = RETRY_PAUSE_S
        for attempt in range(1, TRIES + 1):
            try:
                answer = await client.complete(messages, generation)
            except CloudUnavailable as exc:
                if attempt == TRIES:
                    raise TeacherFailed(
                        f"teacher {teacher.url}: {exc.reason.removeprefix('cloud ')} "
                        f"({exc}) after {TRIES} tries; is it running, and is the URL its "
                        "base including /v1?") from exc
                await asyncio.sleep(pause)
                pause *= 2
                continue
            names[answer.model.name] += 1
            return answer.completion.text
        raise AssertionError("unreachable")

    async def worker() -> None:
        nonlocal done, last_said
        for index in pending:
            item = readings[index]
            try:
                text = await ask(item)
            except CloudError as exc:  # refused or malformed: this reading's, unless all are
                dropped[f"teacher refused ({exc.reason})"] += 1
                refused = sum(n for why, n in dropped.items() if why.startswith("teacher "))
                if not names and refused >= 2 * teacher.concurrency:
                    raise TeacherFailed(f"teacher {teacher.url}: the first {refused} requests "
                                        f"were all refused: {exc}") from exc
            else:
                output, problem = _output(text, route)
                if output is None:
                    dropped[problem] += 1
                else:
                    answers[index] = Example(item.topic, item.reading, output)
            done += 1
            now = time.monotonic()
            if done % every == 0 or now - last_said >= 5:
                last_said = now
                say(f"teacher: {done}/{len(readings)} answered, "
                    f"{sum(dropped.values())} dropped, {done / (now - started):.1f}/s")

    try:
        async with asyncio.TaskGroup() as group:
            for n in range(min(teacher.concurrency, len(readings))):
                group.create_task(worker(), name=f"teacher-{n}")
    except BaseExceptionGroup as group_error:
        failed = group_error.subgroup(TeacherFailed)
        if failed is not None:
            raise failed.exceptions[0] from None
        raise
    finally:
        await client.aclose()
    labelled = [a for a in answers if a is not None]
    elapsed = time.monotonic() - started
    say(f"teacher: {len(labelled)} of {len(readings)} readings labelled in {elapsed:.1f} s "
        f"({len(readings) / max(elapsed, 1e-9):.1f}/s); {sum(dropped.values())} dropped"
        + "".join(f"; {n} {why}" for why, n in dropped.most_common()))
    if not labelled:
        raise TeacherFailed(f"teacher {teacher.url}: none of {len(readings)} answers was usable: "
                            + "; ".join(f"{n} {why}" for why, n in dropped.most_common()))
    model = names.most_common(1)[0][0] if names else teacher.model
    return Labels(labelled, dropped, model, elapsed)


def _output(text: str, route: Route) -> tuple[dict[str, Any] | None, str]:
    """The answer as an output, or (None, why it is dropped: a short, countable reason)."""
    value, problem = check_output(text, route.output_schema or {})
    if problem is not None:
        kind = ("not strict JSON" if problem.startswith("output is not strict JSON")
                else "fails the output_schema")
        return None, f"answer {kind}"
    if not isinstance(value, dict):
        return None, "answer not a JSON object"
    return value, ""
