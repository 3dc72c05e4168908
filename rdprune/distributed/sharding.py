"""Divide curve estimation among ranks: (layer, range of levels) pieces balanced by estimated cost.

Whole layers cannot balance a network whose first layer costs a whole forward pass per level, nor
54 layers over 64 ranks, so the unit of work is one level of one layer. The units of all layers
(names sorted) are laid end to end and cut into one contiguous run per rank at the unit boundaries
nearest the equal-cost marks; a rank's run becomes at most a few pieces, and the largest shard
exceeds the mean by less than one unit's cost. Pure arithmetic: every rank gets the same plan.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Costs = Mapping[str, tuple[float, int]]
"""``{layer name: (cost of evaluating one level, number of levels to evaluate)}``."""


@dataclass(frozen=True)
class Piece:
    """Levels ``start`` (inclusive) to ``stop`` (exclusive) of one unit's curve (a layer, a channel group, ...)."""

    unit: str
    start: int
    stop: int


def _check_costs(costs: Costs) -> list[str]:
    for name, (cost, levels) in costs.items():
        if not (np.isfinite(cost) and cost >= 0) or int(levels) != levels or levels < 0:
            raise ValueError(f"layer {name!r}: cost must be finite and >= 0 and levels an integer >= 0, "
                             f"got ({cost!r}, {levels!r})")
    return sorted(name for name, (_, levels) in costs.items() if levels > 0)


def plan_shards(costs: Costs, world_size: int) -> list[list[Piece]]:
    """One list of pieces per rank covering every (layer, level) exactly once, balanced by cost.

    Ranks beyond the number of level evaluations get empty lists (they still join collectives).
    When every cost is zero the levels are balanced by count instead.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be an integer >= 1, got {world_size!r}")
    names = _check_costs(costs)
    counts = np.array([int(costs[n][1]) for n in names], dtype=np.int64)
    unit_cost = np.repeat(np.array([float(costs[n][0]) for n in names]), counts)
    if unit_cost.size and unit_cost.sum() == 0:
        unit_cost = np.ones_like(unit_cost)
    cum = np.concatenate([[0.0], np.cumsum(unit_cost)])
    marks = cum[-1] * np.arange(1, world_size) / world_size
    # Boundary nearest each mark: the first at or past it, or the one before when that is closer.
    after = np.searchsorted(cum, marks, side="left")
    before = np.maximum(after - 1, 0)
    cuts = np.where(np.abs(cum[np.minimum(after, cum.size - 1)] - marks) < np.abs(marks - cum[before]), after, before)
    bounds = np.concatenate([[0], np.maximum.accumulate(cuts), [unit_cost.size]]).astype(np.int64)
    layer_starts = np.concatenate([[0], np.cumsum(counts)])
    return [_pieces(names, layer_starts, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _pieces(names: list[str], layer_starts: np.ndarray, lo: int, hi: int) -> list[Piece]:
    """Pieces covering units ``lo:hi`` of the end-to-end sequence."""
    pieces = []
    first = int(np.searchsorted(layer_starts, lo, side="right")) - 1
    for i in range(max(first, 0), len(names)):
        start, stop = int(layer_starts[i]), int(layer_starts[i + 1])
        if start >= hi:
            break
        a, b = max(lo, start), min(hi, stop)
        if a < b:
            pieces.append(Piece(names[i], a - start, b - start))
    return pieces


def shard_costs(plan: list[list[Piece]], costs: Costs) -> list[float]:
    """Estimated cost of each rank's shard."""
    return [sum(float(costs[p.unit][0]) * (p.stop - p.start) for p in shard) for shard in plan]


def shard_balance(plan: list[list[Piece]], costs: Costs) -> float:
    """Largest shard's cost over the mean shard's cost (1.0 is perfect; 1.0 when there is no work)."""
    loads = shard_costs(plan, costs)
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0
