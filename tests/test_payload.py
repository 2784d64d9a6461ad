"""Payload validation: every kind of bad input is refused with a reason, nothing else escapes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.routing.payload import PayloadRejected, parse

LIMITS = {"max_bytes": 1024, "max_depth": 8}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"x" * 1025, "exceeds the limit"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"a": ', "malformed JSON"),
        (b'{"a": NaN}', "NaN is not allowed"),
        (b"[Infinity]", "Infinity is not allowed"),
        (b'{"a": ' + b"9" * 30 + b"}", "too large"),
        (b"[" * 9 + b"]" * 9, "depth 9 exceeds 8"),
        (b"[" * 1000 + b"]" * 1000, "exceeds the limit"),
        (b'{"seq": 1, "celsius": 1e400}', "1e400 overflows a double"),
        (b'{"celsius": -1e400}', "overflows a double"),
        (b'[1.8e308]', "overflows a double"),
        (b'{"name": "\\ud800"}', "lone surrogate"),
        (b'{"\\udc00": 1}', "lone surrogate"),
        (b'{"a": ["ok", {"b": "x\\udfff"}]}', "lone surrogate"),
    ],
)
def test_bad_payloads_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    """Each refusal names what is wrong, for the dead-letter table."""
    with pytest.raises(PayloadRejected, match=reason):
        parse(payload, **LIMITS)


def test_what_passes_can_be_written_back_as_strict_utf8_json() -> None:
    """A surrogate pair is a real character and passes; so does the largest finite double:
    both re-serialize the way a result is written (agent/messages.encode)."""
    from agent.routing.outbound import encode

    value = parse(b'{"emoji": "\\ud83d\\ude00", "big": 1.7e308, "nul": "a\\u0000b"}', **LIMITS)
    assert value["emoji"] == "\U0001F600"
    assert json.loads(encode({"source": value}).decode("utf-8")) == {"source": value}


def test_deep_nesting_within_the_size_limit_is_refused_not_a_crash() -> None:
    """Nesting deep enough to exhaust the parser's recursion is a reason, not a RecursionError."""
    payload = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(PayloadRejected, match="nesting"):
        parse(payload, max_bytes=1_000_000, max_depth=32)


def test_a_good_reading_decodes() -> None:
    assert parse(b'{"seq": 1, "celsius": 21.5, "tags": ["a"]}', **LIMITS) == {
        "seq": 1, "celsius": 21.5, "tags": ["a"]}


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_either_decode_or_are_refused(payload: bytes) -> None:
    """No input makes the validator raise anything but PayloadRejected."""
    try:
        parse(payload, **LIMITS)
    except PayloadRejected as exc:
        reason = str(exc)
    else:
        reason = "decoded"
    assert reason


def test_a_route_input_schema_violation_names_where() -> None:
    from agent.base.validation import schema_violation

    schema = {"type": "object", "required": ["celsius"],
              "properties": {"celsius": {"type": "number"}}}
    assert schema_violation({"celsius": 21.5}, schema) is None
    assert schema_violation({"celsius": "hot"}, schema) == (
        "at celsius: 'hot' is not of type 'number'")
    assert schema_violation([1], schema) == "at (root): [1] is not of type 'object'"
