"""Datasets by name, calibration inputs and deterministic, rank-sharded loaders."""
from __future__ import annotations

import importlib

_LAZY = {
    "calibration_inputs": "rdprune.data.calibration",
    "infinite_batches": "rdprune.data.loaders",
    "train_loader": "rdprune.data.loaders",
    "DATASET_NAMES": "rdprune.data.registry",
    "DataBundle": "rdprune.data.registry",
    "build_data": "rdprune.data.registry",
}
"""Public names and their modules, imported on first use: the config reads this package's
light ``choices`` module without importing torch."""


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = globals()[name] = getattr(importlib.import_module(_LAZY[name]), name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATASET_NAMES", "DataBundle", "build_data", "calibration_inputs",
    "infinite_batches", "train_loader",
]
