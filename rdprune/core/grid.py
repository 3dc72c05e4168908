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


def level_amounts(levels: int, grid: Grid, current_sparsity: float, max_amount: float = 1.0) -> np.ndarray:
    """Absolute amounts to evaluate for a layer that is ``current_sparsity`` sparse now.

    ``max_amount`` is the most the layer's floor allows (:func:`rdprune.core.floor.max_amount`);
    the grid's top level is ``max(max_amount, current_sparsity)``, never more:

    ``absolute``: the published levels (``levels`` uniform amounts in [0, 1]) that lie below
    ``max_amount``, then the top level; with ``max_amount = 1`` exactly the published grid.
    ``relative``: ``levels`` uniform amounts from the current sparsity to ``max_amount``, so a
    layer that is already 97 % sparse still has fine choices. A layer already at or beyond its
    floor gets the single level ``current_sparsity``.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2 (it includes amounts 0 and 1), got {levels!r}")
    if not 0.0 <= current_sparsity <= 1.0:
        raise ValueError(f"current sparsity must be in [0, 1], got {current_sparsity}")
    if not 0.0 <= max_amount <= 1.0:
        raise ValueError(f"max_amount must be in [0, 1], got {max_amount}")
    top = max(float(max_amount), float(current_sparsity))
    if grid == "absolute":
        published = np.linspace(0.0, 1.0, levels)
        return np.append(published[published < max_amount], top)
    if grid == "relative":
        if current_sparsity >= max_amount:
            return np.array([float(current_sparsity)])
        amounts = current_sparsity + (top - current_sparsity) * np.linspace(0.0, 1.0, levels)
        amounts[-1] = top
        return amounts
    raise ValueError(f"grid must be 'relative' or 'absolute', got {grid!r}")
