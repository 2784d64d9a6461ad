"""Validation of sensor payloads: size before decoding, strict UTF-8, strict JSON, bounded depth.

Pure logic. Each refusal carries a reason that ends up in the dead-letter table; nothing here
raises anything but `PayloadRejected`.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from agent.errors import PermanentError

MAX_INT_DIGITS = 20


class PayloadRejected(PermanentError):
    """The payload cannot be a reading; `str(exc)` is the dead-letter reason."""


def _reject_constant(name: str) -> NoReturn:
    raise PayloadRejected(f"JSON constant {name} is not allowed")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise PayloadRejected(f"integer with {len(text)} digits is too large")
    return int(text)


def parse(payload: bytes, *, max_bytes: int, max_depth: int) -> Any:
    """Return the decoded JSON value, or raise PayloadRejected with the reason."""
    if len(payload) > max_bytes:
        raise PayloadRejected(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadRejected(f"payload is not UTF-8 (byte {exc.start})") from exc
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
    except RecursionError as exc:
        raise PayloadRejected(f"JSON nesting deeper than {max_depth}") from exc
    except json.JSONDecodeError as exc:
        raise PayloadRejected(f"malformed JSON: {exc.msg} at position {exc.pos}") from exc
    depth = _depth(value)
    if depth > max_depth:
        raise PayloadRejected(f"JSON nesting depth {depth} exceeds {max_depth}")
    return value


def _depth(value: Any) -> int:
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in node)
    return deepest
