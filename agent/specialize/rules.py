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
the demo's sensors publish ({"sensor", "seq", "ts", <field>}) and two shorter ones.

A route that answers windows of readings (window_max_readings or window_cap_readings above 1)
takes a window rule instead, whose conditions aggregate one numeric field over the window's
readings in window order:

    --rule 'mean(rms)>7.1 or rise(rms)>3:true,else:false'

A condition is one or more terms AGG(FIELD) OP NUMBER joined by `or` (or all by `and`), AGG one
of mean, min, max, first, last, rise (last minus first; 0 for one reading). Values are compared
as the decimals they are written as (exact fractions, so the mean of 7.0, 7.1 and 7.2 is 7.1,
not above it). A plain threshold rule on a windowed route, or a window rule on a route that
answers one reading at a time, is refused: the student must learn the prompts the agent sends.
Synthetic windows come from one sensor (readings in sequence, one shape and one number format
per window, shorter shapes than single readings'), of every size the route's windows take, the
full size most often; half of them are drawn with one term within a twentieth of the range of
its threshold. Pure logic.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
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


def parse_rule(text: str, route: Route) -> Rule | WindowRule:
    """The rule in `text` for `route` (a window rule for a windowed route); a ValueError names
    the clause at fault."""
    if route.windowed:
        return parse_window_rule(text, route)
    if "(" in text:
        raise ValueError(f"rule {text!r}: route {route.name!r} answers one reading at a time; "
                         "a window rule (AGG(FIELD)...) needs window_max_readings above 1")
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


def default_range(rule: Rule | WindowRule) -> tuple[float, float]:
    """Three times the thresholds' spread (at least 10) on either side of them; for a window
    rule, see window_range."""
    if isinstance(rule, WindowRule):
        return window_range(rule)
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


# -- window rules -----------------------------------------------------------------------------

AGGREGATES = ("mean", "min", "max", "first", "last", "rise")
_TERM = re.compile(r"^\s*([a-z]+)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*(<=|>=|<|>)\s*"
                   r"(-?\d+(?:\.\d+)?)\s*$")
_CONDITION = re.compile(r"^(.*\S)\s*:\s*(\S+)\s*$")
_JOINER = re.compile(r"\s+(or|and)\s+")


def exact(x: float | int) -> Fraction:
    """A reading's number as the decimal it is written as (7.1 is 71/10, not the float)."""
    return Fraction(x) if isinstance(x, int) else Fraction(repr(float(x)))


def aggregate(name: str, values: Sequence[Fraction]) -> Fraction:
    if name == "mean":
        return sum(values, Fraction(0)) / len(values)
    if name == "rise":
        return values[-1] - values[0]
    if name == "min":
        return min(values)
    if name == "max":
        return max(values)
    return values[0] if name == "first" else values[-1]


@dataclass(frozen=True, slots=True)
class Term:
    agg: str
    op: str
    threshold: Fraction

    def holds(self, values: Sequence[Fraction]) -> bool:
        x = aggregate(self.agg, values)
        return {"<": x < self.threshold, "<=": x <= self.threshold,
                ">": x > self.threshold, ">=": x >= self.threshold}[self.op]


@dataclass(frozen=True, slots=True)
class WindowClause:
    terms: tuple[Term, ...]
    every: bool  # joined by `and` (all terms hold) rather than `or` (any)
    value: Any

    def holds(self, values: Sequence[Fraction]) -> bool:
        hits = (term.holds(values) for term in self.terms)
        return all(hits) if self.every else any(hits)


@dataclass(frozen=True, slots=True)
class WindowRule:
    field: str
    key: str
    clauses: tuple[WindowClause, ...]
    otherwise: Any
    text: str

    def label(self, readings: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The answer for a window of readings, in window order."""
        if not readings:
            raise ValueError("a window has at least one reading")
        values = []
        for reading in readings:
            x = reading.get(self.field)
            if isinstance(x, bool) or not isinstance(x, int | float):
                raise ValueError(f"reading has no numeric {self.field!r}: {reading}")
            values.append(exact(x))
        for clause in self.clauses:
            if clause.holds(values):
                return {self.key: clause.value}
        return {self.key: self.otherwise}

    @property
    def terms(self) -> list[Term]:
        return [term for clause in self.clauses for term in clause.terms]


def parse_window_rule(text: str, route: Route) -> WindowRule:
    """The window rule in `text` for a windowed `route`; a ValueError names the clause or the
    term at fault."""
    key = output_key(route)
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) < 2:
        raise ValueError(f"rule {text!r}: need at least one condition and an else clause")
    clauses: list[WindowClause] = []
    fields: set[str] = set()
    for part in parts[:-1]:
        match = _CONDITION.match(part.strip())
        if not match:
            raise ValueError(f"rule clause {part.strip()!r} is not CONDITION:VALUE")
        condition, value = match.groups()
        joiners = set(_JOINER.findall(condition))
        if len(joiners) > 1:
            raise ValueError(f"rule clause {part.strip()!r} mixes and with or: write one "
                             "clause per and-group, in order")
        terms = []
        for piece in _JOINER.split(condition)[::2]:
            term = _TERM.match(piece)
            if not term:
                raise ValueError(
                    f"rule clause {part.strip()!r}: {piece.strip()!r} is not AGG(FIELD)<NUMBER "
                    f"(AGG one of {', '.join(AGGREGATES)}; operators <, <=, >, >=)")
            agg, field, op, number = term.groups()
            if agg not in AGGREGATES:
                raise ValueError(f"rule clause {part.strip()!r}: {agg!r} is not one of "
                                 f"{', '.join(AGGREGATES)}")
            fields.add(field)
            terms.append(Term(agg, op, Fraction(number)))
        clauses.append(WindowClause(tuple(terms), joiners == {"and"},
                                    _value(value, key, route, part)))
    last = _ELSE.match(parts[-1])
    if not last:
        raise ValueError(f"rule {text!r}: the last clause must be else:VALUE, "
                         f"got {parts[-1].strip()!r}")
    if len(fields) != 1:
        raise ValueError(f"rule {text!r}: every term must aggregate the same field, "
                         f"got {sorted(fields)}")
    return WindowRule(fields.pop(), key, tuple(clauses),
                      _value(last.group(1), key, route, parts[-1]), text)


def window_range(rule: WindowRule) -> tuple[float, float]:
    """Twice the scale either side of the level thresholds (those of mean, min, max, first and
    last), the scale being their spread or the largest rise threshold (at least 1); not below 0
    when no level threshold is (an rms, a count)."""
    levels = [float(t.threshold) for t in rule.terms if t.agg != "rise"] or [0.0]
    rises = [abs(float(t.threshold)) for t in rule.terms if t.agg == "rise"]
    low, high = min(levels), max(levels)
    scale = max(high - low, *rises, 1.0)
    start = low - 2 * scale
    if start < 0 <= min(levels):
        start = 0.0
    return start, high + 2 * scale


def window_size(rng: random.Random, route: Route) -> int:
    """A size the route's windows take: the full window_max_readings most often (a steady
    sensor fills it), else any from 1 (a window whose wait ran out) to the cap (a backlog)."""
    if rng.random() < 0.6:
        return route.window_max_readings
    return rng.randint(1, route.window_cap)


def synthetic_window_values(rng: random.Random, rule: WindowRule, span: tuple[float, float],
                            size: int) -> list[float | int]:
    """`size` values of one sensor: a mean across `span`, a trend about it (a rise of up to twice
    times the scale, or a fall of up to one) and noise; half the time one term of the rule is
    put within a twentieth of the span of its threshold. Rounded alike to 0, 1 or 2 decimals."""
    low, high = span
    width = high - low
    rises = [abs(float(t.threshold)) for t in rule.terms if t.agg == "rise"]
    scale = max(rises or [width / 4])
    level = rng.uniform(low, high)
    trend = rng.uniform(-scale, 2 * scale)
    values = [level + trend * (i / max(1, size - 1) - 0.5) + rng.gauss(0, scale / 10)
              for i in range(size)]
    if rng.random() < 0.5:
        term = rng.choice(rule.terms)
        target = float(term.threshold) + rng.uniform(-width / 20, width / 20)
        values = _near(term.agg, target, values)
    values = [min(high, max(low, x)) for x in values]
    decimals = rng.choice((0, 1, 2))
    return [round(x) if decimals == 0 else round(x, decimals) for x in values]


def _near(agg: str, target: float, values: list[float]) -> list[float]:
    """`values` moved so that their `agg` is `target` (before rounding)."""
    if agg == "mean":
        shift = target - sum(values) / len(values)
        return [x + shift for x in values]
    if agg == "rise":
        return values if len(values) == 1 else [*values[:-1], values[0] + target]
    if agg == "first":
        return [target, *values[1:]]
    if agg == "last":
        return [*values[:-1], target]
    if agg == "max":
        top = values.index(max(values))
        return [target if i == top else min(x, target) for i, x in enumerate(values)]
    bottom = values.index(min(values))
    return [target if i == bottom else max(x, target) for i, x in enumerate(values)]


def synthetic_window(rng: random.Random, field: str, values: Sequence[float | int]
                     ) -> tuple[str, list[dict[str, Any]]]:
    """(sensor name, readings) of one sensor in sequence, in one shape throughout: with a
    sequence number, with the sensor's name, or the value alone. Shorter than the demo
    sensors' shape (no 14-digit timestamp): a window repeats it on every line, and training
    time grows with the prompt; label real windows (--labels) for a sensor that sends more."""
    sensor = f"{rng.choice(SENSOR_NAMES)}-{rng.randint(1, 12)}"
    shape = rng.choices(("seq", "bare", "named"), weights=(4, 3, 3))[0]
    seq = rng.randint(0, 99_999)
    readings: list[dict[str, Any]] = []
    for i, value in enumerate(values):
        if shape == "seq":
            readings.append({"seq": seq + i, field: value})
        elif shape == "named":
            readings.append({"sensor": sensor, field: value})
        else:
            readings.append({field: value})
    return sensor, readings
