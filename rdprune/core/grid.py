"""Level grids and the rate-distortion curve type shared by curve estimation and allocation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Grid = Literal["relative", "absolute"]


@dataclass(frozen=True)
class Curve:
    """Distortion of the network output when one layer is pruned to each of several amounts.

    ``amounts`` are absolute (fraction of the layer's weights pruned, zeros included), strictly
    increasing; ``distortion[k]`` is the measured distortion at ``amounts[k]``.
    """

    amounts: np.ndarray
    distortion: np.ndarray

    def __post_init__(self) -> None:
        a, d = np.asarray(self.amounts, np.float64), np.asarray(self.distortion, np.float64)
        if a.ndim != 1 or a.shape != d.shape or a.size == 0:
            raise ValueError(f"a curve needs equal-length 1-d amounts and distortions, got {a.shape} and {d.shape}")
        if np.any(np.diff(a) <= 0) or a[0] < 0 or a[-1] > 1:
            raise ValueError("curve amounts must be strictly increasing within [0, 1]")
        if not np.all(np.isfinite(d)):
            raise ValueError("curve distortions must be finite (NaN or inf found)")
        object.__setattr__(self, "amounts", a)
        object.__setattr__(self, "distortion", d)


def check_grid(amounts: np.ndarray) -> None:
    """A user-supplied grid must be increasing and contain both 0 and 1."""
    a = np.asarray(amounts, np.float64)
    if a.ndim != 1 or a.size < 2 or a[0] != 0.0 or a[-1] != 1.0 or np.any(np.diff(a) <= 0):
        raise ValueError(f"a level grid must be strictly increasing from 0 to 1 inclusive, got {a.tolist()[:6]}...")


def level_amounts(levels: int, grid: Grid, current_sparsity: float) -> np.ndarray:
    """Absolute amounts to evaluate for a layer that is ``current_sparsity`` sparse now.

    ``absolute``: ``levels`` uniform amounts in [0, 1] (the published grid).
    ``relative``: ``levels`` uniform amounts from the current sparsity to 1, so a layer that is
    already 97 % sparse still has fine choices.
    """
    if not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2 (it includes amounts 0 and 1), got {levels!r}")
    if grid == "absolute":
        return np.linspace(0.0, 1.0, levels)
    if grid == "relative":
        if not 0.0 <= current_sparsity <= 1.0:
            raise ValueError(f"current sparsity must be in [0, 1], got {current_sparsity}")
        return current_sparsity + (1.0 - current_sparsity) * np.linspace(0.0, 1.0, levels)
    raise ValueError(f"grid must be 'relative' or 'absolute', got {grid!r}")
