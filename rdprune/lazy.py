"""Public names of a package imported on first use, so that importing the package imports no torch.

``rdprune``, ``rdprune.data`` and ``rdprune.distributed`` re-export names of heavy modules; the config
loader imports these packages (their light ``choices`` modules, ``rdprune.errors``) and must not pay
for torch. Each package sets ``__getattr__ = lazy_exports(__name__, {name: "module:attribute"})``.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

from rdprune.registry import load


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that imports ``where[name]`` (``"module:attribute"``) on first use and keeps it."""

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = load(where[name])
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
