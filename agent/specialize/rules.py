"""Labelling rules: a threshold table written on one line, and the synthetic readings it labels.

    --rule 'celsius<60:normal,celsius<85:warning,else:critical'

Clauses are tried in order and the first that holds gives the answer, the way an operator reads
a threshold table; the last clause is `else`. Each clause compares one numeric field of the
reading (<, <=, >, >=) with a number; every clause names the same field. The answer is the value
of the route's output schema's one required property (`level` for the temperature route); a
value is a string, or true/false for a boolean property, and must satisfy the schema.

One line on the command line rather than a rule section in a TOML file: a rule is three
thresholds, it belongs in the command (and the recipe.json written beside the model) that made
the model, and a file of its own would be one more thing to keep next to the labels.

Synthetic readings cover the range around the thresholds (three times their spread on either
side, or --range), half of them drawn near a threshold, where a student errs first, in the shape
the demo's sensors publish ({"sensor", "seq", "ts", <field>}) and two shorter ones. Pure logic.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

from agent.base.validation import check_output
from agent.config.settings import Route

_CLAUSE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*(-?\d+(?:\.\d+)?)\s*:"
                     r"\s*(\S+)\s*$")
_ELSE = re.compile(r"^\s*else\s*:\s*(\S+)\s*$")
SENSOR_NAMES = ("press", "oven", "cooler", "boiler", "pump", "line", "kiln", "tank")


@dataclass(frozen=True, slots=True)
class Clause:
    op: str
    threshold: float
    value: Any

    def holds(self, x: float) -> bool:
        return {"<": x < self.threshold, "<=": x <= self.threshold,
                ">": x > self.threshold, ">=": x >= self.threshold}[self.op]


@dataclass(frozen=True, slots=True)
class Rule:
    field: str
    key: str  # the output property the rule decides
    clauses: tuple[Clause, ...]
    otherwise: Any
    text: str

    def label(self, reading: dict[str, Any]) -> dict[str, Any]:
        x = reading.get(self.field)
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise ValueError(f"reading has no numeric {self.field!r}: {reading}")
        for clause in self.clauses:
            if clause.holds(float(x)):
                return {self.key: clause.value}
        return {self.key: self.otherwise}

    @property
    def thresholds(self) -> list[float]:
        return sorted({c.threshold for c in self.clauses})


def output_key(route: Route) -> str:
    """The one required property of the route's output schema, which a rule decides."""
    schema = route.output_schema or {}
    required = schema.get("required") or []
    if schema.get("type") != "object" or len(required) != 1:
        raise ValueError(f"route {route.name!r}: a rule needs an output_schema of type object "
                         f"with exactly one required property, got {schema or None}")
    return str(required[0])


def parse_rule(text: str, route: Route) -> Rule:
    """The rule in `text` for `route`; a ValueError names the clause at fault."""
    key = output_key(route)
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) < 2:
        raise ValueError(f"rule {text!r}: need at least one comparison and an else clause")
    clauses: list[Clause] = []
    fields: set[str] = set()
    for part in parts[:-1]:
        match = _CLAUSE.match(part)
        if not match:
            raise ValueError(f"rule clause {part.strip()!r} is not FIELD<NUMBER:VALUE "
                             "(operators <, <=, >, >=)")
        field, op, number, value = match.groups()
        fields.add(field)
        clauses.append(Clause(op, float(number), _value(value, key, route, part)))
    last = _ELSE.match(parts[-1])
    if not last:
        raise ValueError(f"rule {text!r}: the last clause must be else:VALUE, "
                         f"got {parts[-1].strip()!r}")
    if len(fields) != 1:
        raise ValueError(f"rule {text!r}: every clause must compare the same field, "
                         f"got {sorted(fields)}")
    return Rule(fields.pop(), key, tuple(clauses), _value(last.group(1), key, route, parts[-1]),
                text)


def _value(text: str, key: str, route: Route, clause: str) -> Any:
    value: Any = {"true": True, "false": False}.get(text, text)
    _, problem = check_output(json.dumps({key: value}), route.output_schema or {})
    if problem and isinstance(value, bool):  # a string property may hold "true"
        value = text
        _, problem = check_output(json.dumps({key: value}), route.output_schema or {})
    if problem:
        raise ValueError(f"rule clause {clause.strip()!r}: {key}={value!r} does not satisfy "
                         f"route {route.name!r}'s output schema: {problem}")
    return value


def default_range(rule: Rule) -> tuple[float, float]:
    """Three times the thresholds' spread (at least 10) on either side of them."""
    low, high = rule.thresholds[0], rule.thresholds[-1]
    spread = max(high - low, 10.0)
    return low - 3 * spread, high + 3 * spread


def topic_for(route: Route, sensor: str) -> str:
    """A concrete topic of the route's first filter, the sensor's name in its wildcards."""
    levels = [sensor if level in ("+", "#") else level for level in route.topics[0].split("/")]
    return "/".join(levels)


def synthetic_value(rng: random.Random, rule: Rule, span: tuple[float, float]) -> float | int:
    """A value across `span`, or (half the time) within 2 of a threshold, at 0, 1 or 2 decimals
    alike (a student taught mostly one format misreads the others)."""
    if rng.random() < 0.5:
        x = rng.uniform(*span)
    else:
        x = rng.choice(rule.thresholds) + rng.uniform(-2.0, 2.0)
    decimals = rng.choice((0, 1, 2))
    return round(x) if decimals == 0 else round(x, decimals)


def synthetic_reading(rng: random.Random, field: str, value: float | int,
                      seq: int) -> tuple[str, dict[str, Any]]:
    """(sensor name, reading) in one of three shapes, the demo sensors' most often."""
    sensor = f"{rng.choice(SENSOR_NAMES)}-{rng.randint(1, 12)}"
    shape = rng.choices(("demo", "bare", "named"), weights=(6, 2, 2))[0]
    if shape == "demo":
        ts = round(1_760_000_000 + rng.uniform(0, 20_000_000), 3)
        return sensor, {"sensor": sensor, "seq": seq, "ts": ts, field: value}
    if shape == "named":
        return sensor, {"sensor": sensor, field: value}
    return sensor, {field: value}
