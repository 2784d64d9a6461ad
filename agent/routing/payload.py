"""Validation of sensor payloads: size before decoding, strict UTF-8, strict JSON, bounded depth,
and a value that can be written back as strict JSON.

Pure logic. Each refusal carries a reason that ends up in the dead-letter table; nothing here
raises anything but `PayloadRejected`. A payload that passes can be re-serialized with
`allow_nan=False` and encoded as UTF-8 (agent/messages.encode): a number that overflows a double
(`1e400` parses to inf) or an escaped lone surrogate (`"\\ud800"`) passes JSON's grammar but would
fail when its result is written, so it is refused here, before anything is acked.
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

from agent.base.errors import PermanentError

MAX_INT_DIGITS = 20


class PayloadRejected(PermanentError):
    """The payload cannot be a reading; `str(exc)` is the dead-letter reason."""


def _reject_constant(name: str) -> NoReturn:
    raise PayloadRejected(f"JSON constant {name} is not allowed")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise PayloadRejected(f"integer with {len(text)} digits is too large")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise PayloadRejected(f"number {text[:40]} overflows a double")
    return value


# Made once: json.loads with these hooks builds a decoder for every payload.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_int=_parse_int,
                            parse_float=_parse_float)


def parse(payload: bytes, *, max_bytes: int, max_depth: int) -> Any:
    """Return the decoded JSON value, or raise PayloadRejected with the reason."""
    if len(payload) > max_bytes:
        raise PayloadRejected(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadRejected(f"payload is not UTF-8 (byte {exc.start})") from exc
    try:
        if text.startswith("\ufeff"):  # json.loads' own check, which `decode` does not make
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        value = _DECODER.decode(text)
    except RecursionError as exc:
        raise PayloadRejected(f"JSON nesting deeper than {max_depth}") from exc
    except json.JSONDecodeError as exc:
        raise PayloadRejected(f"malformed JSON: {exc.msg} at position {exc.pos}") from exc
    depth = _walk(value)
    if depth > max_depth:
        raise PayloadRejected(f"JSON nesting depth {depth} exceeds {max_depth}")
    return value


def _walk(value: Any) -> int:
    """The nesting depth of `value`; refuses a string or key that is not valid Unicode."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, level)
            for key, child in node.items():
                _check_text(key)
                stack.append((child, level + 1))
        elif isinstance(node, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in node)
        elif isinstance(node, str):
            _check_text(node)
    return deepest


def _check_text(text: str) -> None:
    # JSON's \uXXXX escapes can spell a lone surrogate, which no UTF-8 encoder accepts.
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PayloadRejected(
            f"string holds a lone surrogate (U+{ord(text[exc.start]):04X}), not valid Unicode"
        ) from exc
