"""Datasets by name, calibration inputs and deterministic, rank-sharded loaders."""
from rdprune.data.calibration import calibration_inputs
from rdprune.data.loaders import infinite_batches, train_loader
from rdprune.data.registry import DATASET_NAMES, DataBundle, build_data

__all__ = [
    "DATASET_NAMES", "DataBundle", "build_data", "calibration_inputs",
    "infinite_batches", "train_loader",
]
