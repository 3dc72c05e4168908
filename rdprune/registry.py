"""Registries of the names a config may choose, filled by the packages that implement them.

The config schema reads its lists of choices (granularities and their methods, datasets, engines,
optimisers, ...) from here instead of importing the implementations, so loading and validating a
config imports neither torch nor any implementation: a bad key is refused within a second. Each
package declares its names in a light module (``choices.py``, or a granularity package's
``__init__``) that this module imports on the first read of a registry; the heavy part of an entry
is imported only when a run uses it (:meth:`Registry.load`).

A plug-in registers the same way, in a module named by the environment variable ``RDPRUNE_PLUGINS``
(or imported before the config is read), e.g. a new granularity::

    from rdprune.registry import GRANULARITIES
    from rdprune.granularity.spec import GranularitySpec
    GRANULARITIES.register("pairs", GranularitySpec(name="pairs", ..., plugin="mypkg.pairs:PairStage"))
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_DECLARATIONS = (
    "rdprune.granularity.weight",
    "rdprune.granularity.channel",
    "rdprune.granularity.two_four",
    "rdprune.data.choices",
    "rdprune.models.choices",
    "rdprune.training.choices",
    "rdprune.distributed.choices",
    "rdprune.core.runtime_choices",
)
"""The light modules that declare rdprune's own names, imported on the first read of any registry."""
PLUGINS_VARIABLE = "RDPRUNE_PLUGINS"
"""Environment variable: comma-separated modules that register plug-ins, imported after rdprune's own
(so that every process of a torchrun or SLURM job registers them before it reads its config)."""
_declared = False


def _declare_builtins() -> None:
    global _declared
    if not _declared:
        _declared = True
        plugins = [m.strip() for m in os.environ.get(PLUGINS_VARIABLE, "").split(",") if m.strip()]
        for module in (*_DECLARATIONS, *plugins):
            importlib.import_module(module)


class Registry(Generic[T]):
    """Names of one kind, in registration order, each with what its implementation declares about it."""

    def __init__(self, kind: str, first: tuple[str, ...] = ()):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._first = first  # rdprune's own names, listed in this order whatever imported them first

    def register(self, name: str, entry: T) -> T:
        """Add ``name``; registering a name twice is an error (two implementations would shadow each other)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def names(self) -> tuple[str, ...]:
        _declare_builtins()
        return tuple(sorted(self._entries, key=lambda n: (self._first.index(n) if n in self._first else len(self._first))))

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The entry of ``name``; a KeyError that lists the registered names otherwise."""
        if name not in self.names():
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self._entries)}")
        return self._entries[name]

    def entries(self) -> dict[str, T]:
        return {n: self._entries[n] for n in self.names()}


def load(path: str) -> Any:
    """The object an import path ``package.module:attribute`` names (an entry's heavy part, imported on use)."""
    module, _, attribute = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


GRANULARITIES: Registry[Any] = Registry("granularity", first=("weight", "channel", "semi_structured"))
"""Name -> :class:`rdprune.granularity.spec.GranularitySpec`."""
DATASETS: Registry[dict] = Registry("dataset")
"""Name -> {"needs_root": bool}."""
MODEL_PREFIXES: Registry[str] = Registry("model prefix")
"""Prefix (``timm:``, ``hf:``) -> the library it names; such prefixes never read as an import path."""
OPTIMIZERS: Registry[None] = Registry("optimizer")
SCHEDULERS: Registry[None] = Registry("scheduler")
ENGINES: Registry[None] = Registry("engine")
PRECISIONS: Registry[None] = Registry("precision")
ZERO_STAGES: Registry[None] = Registry("ZeRO stage")
DEVICES: Registry[None] = Registry("device")
RUNTIMES: Registry[str] = Registry("runtime")
"""Name -> import path of its :class:`rdprune.core.runtimes.Runtime` (what a latency budget is measured in)."""
