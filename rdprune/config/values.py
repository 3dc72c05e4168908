"""Config values: type coercion, how values are shown in messages, and the error that names a key.

Shared by the schema (field checks) and the loader (overrides, unknown keys).
"""
from __future__ import annotations

import difflib
import math
import re
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union

from rdprune.errors import ConfigError

# PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; numbers fields accept that spelling.
# YAML 1.1 reads 2:4 as a base-60 integer: 2 * 60 + 4.
_SEXAGESIMAL_TWO_FOUR = 124
_NUMBER_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def show_value(value: Any) -> str:
    """A value as the user wrote it in YAML: strings quoted, true/false, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def choices_text(options: Sequence[Any]) -> str:
    return ", ".join(show_value(o) for o in options)


def coerce(key: str, value: Any, hint: Any, nullable: bool = False) -> Any:
    """Check ``value`` against the type ``hint`` and return it in canonical form (ints as floats
    for float fields), or raise ConfigError. Booleans are never numbers."""
    origin = typing.get_origin(hint)
    if origin is Union:
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return coerce(key, value, inner, nullable=True)
    or_null = " or null" if nullable else ""

    def wrong_type(expected: str) -> ConfigError:
        return ConfigError(key, f"{key}: expected {expected}{or_null}, got {show_value(value)}")

    if value is None:
        raise ConfigError(key, f"{key}: a value is required, got null")
    if origin is Literal:
        options = typing.get_args(hint)
        if not any(type(value) is type(o) and value == o for o in options):
            hint_text = did_you_mean(value, [str(o) for o in options]) if isinstance(value, str) else ""
            if value == _SEXAGESIMAL_TWO_FOUR and "semi_structured" in options:
                hint_text = " (YAML 1.1 reads an unquoted 2:4 as the number 124; write semi_structured)"
            raise ConfigError(key, f"{key} must be one of {choices_text(options)}, got {show_value(value)}{hint_text}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong_type("a mapping of names to values")
        bad = next((k for k in value if not isinstance(k, str) or not k.strip()), None)
        if bad is not None:
            raise ConfigError(key, f"{key}: every key of the mapping must be a name, got {show_value(bad)}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise wrong_type(f"a list of {_type_words(item)}s")
        return [coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong_type("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong_type("an integer")
        return value
    if hint is float:
        if isinstance(value, str) and _NUMBER_TEXT.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong_type("a number")
        if not math.isfinite(value):
            raise wrong_type("a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong_type("a string")
        if not value.strip():
            raise ConfigError(key, f"{key} must not be empty")
        return value
    raise TypeError(f"unsupported config field type {hint!r} for {key}")


def _type_words(hint: Any) -> str:
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(hint, "value")


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    by_lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""
