"""Channel-granularity baselines, what Torch-Pruning users do today, under the same budgets as RD.

- ``unif``: one fraction of every group's channels (each group at least its floor);
- ``glob``: one threshold on channel importance across all groups, importance normalised by its
  group's mean (Torch-Pruning's default for global ranking), so wide and narrow groups compare.

Each is pushed just far enough that the budget's true (non-separable) cost meets the limit: a
bisection on the fraction or the threshold, which the cost decreases with.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from rdprune.granularity.channel.costs import ChannelCost
from rdprune.granularity.channel.space import ChannelSpace

CHANNEL_BASELINES = ("unif", "glob")

_BISECTION_STEPS = 60


def _uniform(space: ChannelSpace, current: Mapping[str, int]) -> Callable[[float], dict[str, int]]:
    def removal(f: float) -> dict[str, int]:
        return {g: max(current[g], min(int(f * grp.size + 0.5), space.max_removed(g))) for g, grp in space.groups.items()}

    return removal


def _global(space: ChannelSpace, current: Mapping[str, int]) -> Callable[[float], dict[str, int]]:
    scores = {}
    for g in space.groups:
        imp = space.importance(g)
        mean = float(imp.mean())
        scores[g] = torch.sort(imp / mean if mean > 0 else imp).values
    top = max(float(s[-1]) for s in scores.values())

    def removal(f: float) -> dict[str, int]:
        threshold = f * top  # f in [0, 1] spans every score
        return {g: max(current[g], min(int((s <= threshold).sum()), space.max_removed(g))) for g, s in scores.items()}

    return removal


def channel_baseline(method: str, space: ChannelSpace, cost: ChannelCost, limit: float,
                     current: Mapping[str, int] | None = None) -> dict[str, int]:
    """Channels removed per group by ``method`` so that ``cost`` is at most ``limit`` (never fewer than ``current``,
    by default what each group has removed already)."""
    current = {g: space.removed(g) for g in space.groups} if current is None else current
    if method not in CHANNEL_BASELINES:
        raise ValueError(f"method {method!r} has no channel form; channel baselines are {CHANNEL_BASELINES}")
    removal = (_uniform if method == "unif" else _global)(space, current)
    if cost(removal(1.0)) > limit:
        raise ValueError(f"budget cannot be met by {method}: with every group at its floor the cost is "
                         f"{cost(removal(1.0)):.6g}, the budget {limit:.6g}")
    if cost(removal(0.0)) <= limit:
        return removal(0.0)
    lo, hi = 0.0, 1.0
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if cost(removal(mid)) <= limit:
            hi = mid
        else:
            lo = mid
    return removal(hi)
