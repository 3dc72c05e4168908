"""Calibration inputs for curve estimation: N training images chosen by the seed, or synthetic noise."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from rdprune.errors import UserError


def calibration_inputs(pool: Dataset, size: int, seed: int) -> torch.Tensor:
    """``size`` images of ``pool`` (un-augmented training images) chosen by ``seed``, stacked.

    The same pool, size and seed give the same images in the same order on every run and rank.
    """
    available = len(pool)
    if size < 1 or size > available:
        raise UserError(f"calibration.size is {size}, but the calibration pool has {available} images; "
                        f"choose a size from 1 to {available}")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:size]
    return torch.stack([pool[i][0] for i in order.tolist()])


def synthetic_inputs(input_shape: Sequence[int], size: int, seed: int) -> torch.Tensor:
    """``size`` N(0, 1) inputs of ``input_shape``: zero-data calibration in normalised input space."""
    if size < 1:
        raise UserError(f"calibration.size must be at least 1, got {size}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, *input_shape, generator=generator)
