"""Keyword arguments for model builders: the automatic ones (classes, channels) and the user's ``model.kwargs``.

rdprune passes the class count and the input's channel count to every builder itself, so a user's
``model.kwargs`` need not repeat them; a repeated one must agree, since the data fixes both. A keyword
the builder does not take is reported as a one-line ``UserError`` naming the key and its config field.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from rdprune.errors import UserError

_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


DATA = "the data (num_classes and the input's channel count)"


def merge_kwargs(model: str, user: Mapping[str, Any] | None, automatic: Mapping[str, Any], source: str = DATA) -> dict[str, Any]:
    """The user's ``model.kwargs`` plus the ``automatic`` keywords rdprune derives from ``source``.

    A key in both is allowed only with the same value: the data fixes the class and channel counts,
    and a model built for others would fail the dry-run forward anyway, less clearly.
    """
    merged = dict(user or {})
    for key, value in automatic.items():
        if key in merged and merged[key] != value:
            raise UserError(
                f"model {model!r}: model.kwargs sets {key}={merged[key]!r}, but rdprune sets {key}={value!r} "
                f"from {source}; drop {key} from model.kwargs"
            )
        merged[key] = value
    return merged


def call_with_kwargs(model: str, builder: Callable[..., Any], kwargs: Mapping[str, Any], *args: Any) -> Any:
    """``builder(*args, **kwargs)``, with a TypeError about one of ``kwargs``' keys turned into a UserError."""
    try:
        return builder(*args, **kwargs)
    except TypeError as exc:
        match = _UNEXPECTED.search(str(exc))
        if match is None or match.group(1) not in kwargs:
            raise
        raise UserError(unknown_keyword(model, match.group(1))) from exc


def unknown_keyword(model: str, key: str) -> str:
    """The message for a keyword that model ``model`` does not take, naming the config field it came from."""
    field = "model.drop_path_rate" if key == "drop_path_rate" else "model.kwargs"
    return f"model {model!r} does not take keyword argument {key!r} (from {field}); remove it"
