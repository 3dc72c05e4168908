"""Datasets by name, calibration inputs and deterministic, rank-sharded loaders."""
from __future__ import annotations

from rdprune.lazy import lazy_exports

_LAZY = {
    "calibration_inputs": "rdprune.data.calibration:calibration_inputs",
    "infinite_batches": "rdprune.data.loaders:infinite_batches",
    "train_loader": "rdprune.data.loaders:train_loader",
    "DATASET_NAMES": "rdprune.data.registry:DATASET_NAMES",
    "DataBundle": "rdprune.data.registry:DataBundle",
    "build_data": "rdprune.data.registry:build_data",
}
"""Public names and where they live, imported on first use: the config reads this package's
light ``choices`` module without importing torch."""


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "DATASET_NAMES", "DataBundle", "build_data", "calibration_inputs",
    "infinite_batches", "train_loader",
]
