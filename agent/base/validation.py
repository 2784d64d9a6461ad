"""Output validation: strict JSON parsing and JSON-schema checks. The only module that imports
jsonschema. Pure logic.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, NoReturn

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why a schema is unusable, or None when it is a valid JSON schema."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return exc.message
    return None


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


@lru_cache(maxsize=64)
def _validator(schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json))


def check_output(text: str, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """Parse the model's answer strictly and validate it: (value, None) or (None, the problem)."""
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return None, f"output is not strict JSON: {exc}"
    problem = schema_violation(value, schema)
    if problem is not None:
        return None, f"output fails the schema {problem}"
    return value, None


def schema_violation(value: Any, schema: dict[str, Any]) -> str | None:
    """Where and how a decoded value breaks the schema ("at <path>: <message>"), or None."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    error = next(iter(validator.iter_errors(value)), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"at {where}: {error.message}"
