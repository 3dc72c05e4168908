"""Calibration inputs for curve estimation: N training images chosen by the seed.

Zero-data calibration (N(0, 1) noise) is :func:`rdprune.core.curves.synthetic_inputs`. The same
draw, larger, gives the images that BatchNorm statistics are re-estimated on.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from rdprune.errors import UserError


def calibration_inputs(pool: Dataset, size: int, seed: int, *, key: str = "calibration.size") -> torch.Tensor:
    """``size`` images of ``pool`` (un-augmented training images) chosen by ``seed``, stacked.

    The same pool, size and seed give the same images in the same order on every run and rank.
    ``key`` names the config key that asked for ``size`` in the error for an impossible size.
    """
    available = len(pool)
    if size < 1 or size > available:
        raise UserError(f"{key} is {size}, but the calibration pool has {available} images; "
                        f"choose a size from 1 to {available}")
    return torch.stack([pool[i][0] for i in _draw(available, size, seed)])


def calibration_labels(pool: Dataset, size: int, seed: int) -> torch.Tensor:
    """The labels of :func:`calibration_inputs` (same pool, size and seed), in the same order."""
    return torch.tensor([int(pool[i][1]) for i in _draw(len(pool), size, seed)], dtype=torch.long)


def _draw(available: int, size: int, seed: int) -> list[int]:
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:size].tolist()
