"""User code named in a config by import path ``package.module:callable`` (models, datasets).

Shared by the model and data registries, so that neither imports the other.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from rdprune.errors import UserError
from rdprune.errors import one_line as _one_line

IMPORT_FORM = "package.module:callable"


def load_callable(spec: str, what: str) -> Callable:
    """Import ``package.module:callable`` named in config field ``what``; UserError if that fails."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"{what} {spec!r} is not an import path of the form '{IMPORT_FORM}'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure inside the user's module is the user's to fix
        raise UserError(f"{what} {spec!r}: cannot import module {module_name!r} ({_one_line(exc)})") from exc
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UserError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"{what} {spec!r}: {attr!r} is a {type(target).__name__}, not a callable")
    return target


def accepts_keyword(fn: Callable, keyword: str, *, through_kwargs: bool = True) -> bool:
    """Whether ``fn`` can be called with ``keyword=...`` (explicitly or, unless ``through_kwargs`` is
    False, through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume it does
        return through_kwargs
    return any((p.name == keyword and p.kind != p.POSITIONAL_ONLY) or (through_kwargs and p.kind == p.VAR_KEYWORD)
               for p in params)
