"""Baseline allocations: ``unif``, ``unifplus``, ``glob``, ``lamp``, ``erk``.

Each returns ``{layer name: absolute amount}`` that :func:`rdprune.core.masks.apply_masks` turns into
magnitude masks (every amount is a whole number of weights over the layer's size).

**Budgets as costs.** Every budget is phrased as a cost per surviving weight of each layer
(:class:`LayerCosts`), counted exactly as :func:`rdprune.core.allocation.allocate` counts it, so
that RD and the baselines compare at the same budget:

- ``weights``: each weight costs 1; the prunable layers keep at most
  ``floor((1 - s) * (sum sizes + dense_weights) + 1e-9) - dense_weights`` weights
  (``dense_weights``: weights of skipped layers, kept dense);
- ``flops``: a surviving weight of layer l costs ``flops_l / size_l``; the remaining FLOPs
  ``sum_l flops_l * surviving_l / size_l + dense_flops`` are at most
  ``(1 - s) * (sum flops + dense_flops)``.

Each method keeps its own shape and prunes along it until the budget holds: never exceeded, and
as close as the shape allows. ``unif``, ``unifplus`` and ``erk`` scale their per-layer fractions
(every layer within one weight of the continuous solution); ``glob`` and ``lamp`` prune weights in
the order of their global score until the kept cost fits (one global threshold). A later budget
(measured latency) plugs in as another :class:`LayerCosts`.

**Floor.** No layer is pruned below its floor (:mod:`rdprune.core.floor`: one weight per output
unit on average, and ``min_density`` of its weights); a target the floors make unreachable raises a
``ValueError`` that says so. On an already-pruned model every baseline prunes among the remaining
weights: no layer's amount falls below its current sparsity.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from rdprune.core.allocation import Budget
from rdprune.core.floor import check_min_density, min_kept

_INT_LIMIT = 2**62  # total integer cost must stay well inside int64


@dataclass(frozen=True)
class LayerCosts:
    """What a budget counts: integer cost units per surviving weight of each layer, and the most
    units the prunable layers together may keep.

    Every baseline uses only :meth:`cost` (non-decreasing in the kept count, 0 at 0) and ``limit``,
    so a cost that is not linear in the count (a latency table) plugs in by overriding :meth:`cost`.
    """

    per_weight: Mapping[str, int]
    limit: int
    unit: str

    def cost(self, name: str, kept: int | np.ndarray) -> int | np.ndarray:
        """Cost of ``kept`` surviving weights of layer ``name`` (a number or an array of them)."""
        return self.per_weight[name] * kept

    def total(self, kept: Mapping[str, float]) -> float:
        return sum(self.cost(n, k) for n, k in kept.items())


def budget_costs(
    budget: Budget,
    sizes: Mapping[str, int],
    target_sparsity: float,
    *,
    flops: Mapping[str, int] | None = None,
    dense_weights: int = 0,
    dense_flops: int = 0,
) -> LayerCosts:
    """The :class:`LayerCosts` of a ``weights`` or ``flops`` budget at ``target_sparsity`` (see the module notes).

    FLOPs costs are exact: ``flops_l / size_l`` scaled by the common denominator of all these
    ratios (1 in practice, as a layer's FLOPs are a multiple of its weight count). Only where exact
    integers would overflow, per-weight costs are rounded up (and the limit down), so the budget
    still holds.
    """
    if isinstance(target_sparsity, bool) or not (isinstance(target_sparsity, (int, float)) and 0.0 <= target_sparsity < 1.0):
        raise ValueError(f"target sparsity must be a number in [0, 1), got {target_sparsity!r}")
    for what, value in (("dense_weights", dense_weights), ("dense_flops", dense_flops)):
        if isinstance(value, bool) or not (isinstance(value, (int, np.integer)) and value >= 0):
            raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    names = list(sizes)
    if budget == "weights":
        total = sum(sizes.values()) + int(dense_weights)
        limit = math.floor((1.0 - target_sparsity) * total + 1e-9) - int(dense_weights)
        return LayerCosts({n: 1 for n in names}, limit, "weights")
    if budget != "flops":
        raise ValueError(f"budget must be 'weights' or 'flops', got {budget!r}")
    flops = flops or {}
    missing = [n for n in names if n not in flops]
    if missing:
        raise ValueError(f"a flops budget needs every prunable layer's dense FLOPs; missing for layers {missing[:5]}")
    bad = [n for n in names if isinstance(flops[n], bool) or not isinstance(flops[n], (int, np.integer)) or flops[n] <= 0]
    if bad:
        raise ValueError(f"flops of layers {bad[:5]} must be positive ints, got {[flops[n] for n in bad[:5]]}")
    total_f = sum(int(flops[n]) for n in names) + int(dense_flops)
    remaining = Fraction((1.0 - target_sparsity) * total_f) - int(dense_flops)
    ratios = {n: Fraction(int(flops[n]), int(sizes[n])) for n in names}
    q = math.lcm(*(r.denominator for r in ratios.values()))
    if q * (total_f + 1) < _INT_LIMIT:
        per_weight = {n: r.numerator * (q // r.denominator) for n, r in ratios.items()}
        return LayerCosts(per_weight, math.floor(remaining * q), "FLOPs")
    scale = 2 ** max(0, (_INT_LIMIT // (total_f + sum(sizes.values()))).bit_length() - 1)
    per_weight = {n: math.ceil(r * scale) for n, r in ratios.items()}
    return LayerCosts(per_weight, math.floor(remaining * scale), f"1/{scale} FLOPs")


def baseline_amounts(
    method: str,
    layers: Mapping[str, nn.Module],
    target_sparsity: float,
    dense_weights: int = 0,
    *,
    budget: Budget = "weights",
    flops: Mapping[str, int] | None = None,
    dense_flops: int = 0,
    min_density: float = 0.0,
) -> dict[str, float]:
    """Per-layer absolute amounts that ``method`` assigns to meet ``target_sparsity`` under ``budget``.

    The budget (``weights`` or ``flops``, with ``dense_weights`` / ``flops`` and ``dense_flops``)
    is counted exactly as :func:`rdprune.core.allocation.allocate` counts it; see the module notes.
    ``min_density`` raises every layer's floor (:mod:`rdprune.core.floor`) above its default of one
    weight per output unit. ``layers`` should be in execution order (``describe_layers`` gives it):
    ``unifplus`` keeps the first conv dense and the last layer at 20 % or more. Raises
    ``ValueError`` for bad input or a target the floors (and the method's own caps) make unreachable.
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; allowed: {', '.join(BASELINES)}")
    if not layers:
        raise ValueError("no prunable layer to allocate")
    min_density = check_min_density(min_density)
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    costs = budget_costs(budget, sizes, target_sparsity, flops=flops, dense_weights=dense_weights, dense_flops=dense_flops)
    zeros = {n: int((m.weight == 0).sum()) for n, m in layers.items()}
    hi = {n: max(zeros[n], sizes[n] - min_kept(m, min_density)) for n, m in layers.items()}
    problem = _Problem(layers, sizes, zeros, hi, costs, method, target_sparsity, budget, min_density)
    counts = _METHODS[method](problem)
    return {n: counts[n] / sizes[n] for n in layers}


@dataclass(frozen=True)
class _Problem:
    """One baseline call: ``lo`` (current zeros) and ``hi`` (floor) bound each layer's pruned count."""

    layers: Mapping[str, nn.Module]
    sizes: dict[str, int]
    lo: dict[str, int]
    hi: dict[str, int]
    costs: LayerCosts
    method: str
    target: float
    budget: str
    min_density: float

    def kept_cost(self, pruned: Mapping[str, float]) -> float:
        return self.costs.total({n: self.sizes[n] - pruned[n] for n in self.sizes})

    def capped(self, caps: Mapping[str, float]) -> _Problem:
        """The same problem with the pruned counts of some layers capped at ``cap * size`` (never below lo)."""
        hi = dict(self.hi)
        for n, cap in caps.items():
            hi[n] = max(self.lo[n], min(hi[n], math.floor(cap * self.sizes[n] + 1e-9)))
        return _Problem(self.layers, self.sizes, self.lo, hi, self.costs, self.method, self.target, self.budget, self.min_density)

    def bounds_met(self) -> dict[str, int] | None:
        """``lo`` when the layers already meet the budget, after checking ``hi`` can; else None."""
        if self.kept_cost(self.lo) <= self.costs.limit:
            return dict(self.lo)
        most = self.kept_cost(self.hi)
        if self.costs.limit < 0:
            raise ValueError(
                f"{self.method} cannot reach target sparsity {self.target} under the {self.budget} budget: the skipped "
                f"layers, kept dense, alone exceed it; allowed: a lower target sparsity or fewer skipped layers"
            )
        if most > self.costs.limit:
            rules = "one weight per output unit in every layer (its floor)"
            if self.min_density > 0:
                rules += f" and min_density={self.min_density} of its weights"
            if self.method == "unifplus":
                rules += ", the first conv dense and 20 % of the last layer"
            raise ValueError(
                f"{self.method} cannot reach target sparsity {self.target} under the {self.budget} budget: "
                f"the prunable layers may keep at most {self.costs.limit} {self.costs.unit}, but keep at least {most} "
                f"with {rules}; allowed: a lower target sparsity" + (" or a lower min_density" if self.min_density > 0 else "")
            )
        return None


def _water_fill(p: _Problem, pruned_at: Callable[[float], dict[str, float]]) -> dict[str, int]:
    """Pruned counts following ``pruned_at(t)`` (non-decreasing in t, within [lo, hi]) that meet the budget.

    Bisection finds the smallest t whose continuous counts keep no more than the budget; each layer
    is then rounded up (most pruning), and layers are given back one weight at a time, those rounded
    up most first, while the budget still holds. Every layer ends within one weight of its
    continuous count; with the weights budget the total is exact.
    """
    done = p.bounds_met()
    if done is not None:
        return done
    names = list(p.sizes)
    limit = p.costs.limit

    def clipped(t: float) -> dict[str, float]:
        raw = pruned_at(t)
        return {n: min(max(raw[n], p.lo[n]), p.hi[n]) for n in names}

    a, b = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (a + b)
        if p.kept_cost(clipped(mid)) <= limit:
            b = mid
        else:
            a = mid
    share = clipped(b)
    counts = {n: min(p.hi[n], max(p.lo[n], math.ceil(share[n] - 1e-9))) for n in names}
    kept = p.kept_cost(counts)
    while kept > limit:  # float rounding in the bisection: prune where it falls least short
        n = max((m for m in names if counts[m] < p.hi[m]), key=lambda m: (share[m] - counts[m], m))
        counts[n] += 1
        kept = p.kept_cost(counts)
    for n in sorted(names, key=lambda m: (-(counts[m] - share[m]), m)):
        if counts[n] > max(p.lo[n], share[n]):  # only rounded-up layers give back, so none drifts off its share
            left = p.sizes[n] - counts[n]
            more = kept + p.costs.cost(n, left + 1) - p.costs.cost(n, left)
            if more <= limit:
                counts[n] -= 1
                kept = more
    return counts


def _uniform(p: _Problem) -> dict[str, int]:
    return _water_fill(p, lambda t: {n: t * p.sizes[n] for n in p.sizes})


def _unif(p: _Problem) -> dict[str, int]:
    """The same fraction in every layer (layers at their floor or already sparser excepted)."""
    return _uniform(p)


def _unifplus(p: _Problem) -> dict[str, int]:
    """Uniform, except the first conv stays dense and the last layer keeps at least 20 % of its weights.

    First and last follow the order of ``layers`` (the first ``Conv2d``, the last prunable layer).
    """
    names = list(p.layers)
    caps = {names[-1]: 0.8}
    first_conv = next((n for n in names if isinstance(p.layers[n], nn.Conv2d)), None)
    if first_conv is not None:
        caps[first_conv] = 0.0
    return _uniform(p.capped(caps))


def _erk(p: _Problem) -> dict[str, int]:
    """Erdős–Rényi-Kernel: density proportional to (sum of dims) / (product of dims).

    Layers whose density would exceed 1 (or their current density, as no layer may get denser)
    are capped there, and layers at their floor stay there; the rest are rescaled, which the
    water-filling does in one pass.
    """
    score = {n: sum(m.weight.shape) / float(np.prod(m.weight.shape)) for n, m in p.layers.items()}
    top = max(score.values())

    # t = 0 keeps everything, t = 1 keeps nothing: the scale eps runs from inf down to 0.
    def pruned_at(t: float) -> dict[str, float]:
        eps = np.inf if t <= 0 else (1.0 - t) / t / top
        return {n: p.sizes[n] * (1.0 - min(1.0, eps * score[n])) for n in p.sizes}

    return _water_fill(p, pruned_at)


def _global_threshold(p: _Problem, ranked_scores: Callable[[torch.Tensor], np.ndarray]) -> dict[str, int]:
    """Prune weights in increasing global score until the kept cost fits the budget.

    ``ranked_scores(w)`` gives a layer's scores in increasing order; within a layer both scores grow
    with |w|, so the layer's k lowest scores are its k smallest weights, the ones its mask prunes.
    Current zeros (``lo``) go first and no layer goes past its floor (``hi``). The threshold is the
    smallest score at which the kept cost fits (a bisection over the ordered bit patterns of
    non-negative doubles, each step a binary search per layer: no global sort); weights tied at it
    are taken in layer order, then magnitude rank, only as many as the budget needs.
    """
    done = p.bounds_met()
    if done is not None:
        return done
    names = list(p.layers)
    ranked = {n: ranked_scores(p.layers[n].weight.detach().flatten().double().cpu()) for n in names}

    def counts_at(value: float, side: str) -> dict[str, int]:
        return {n: min(max(int(np.searchsorted(ranked[n], value, side)), p.lo[n]), p.hi[n]) for n in names}

    def value(bits: int) -> float:
        return float(np.array(bits, dtype=np.int64).view(np.float64))

    top = max(float(r[-1]) for r in ranked.values())
    below, fits = -1, int(np.array(top, dtype=np.float64).view(np.int64))  # -1: under every score (counts = lo)
    while fits - below > 1:
        mid = (below + fits) // 2
        if p.kept_cost(counts_at(value(mid), "right")) <= p.costs.limit:
            fits = mid
        else:
            below = mid
    threshold = value(fits)
    counts, upto = counts_at(threshold, "left"), counts_at(threshold, "right")
    kept = p.kept_cost(counts)
    for n in names:  # weights tied at the threshold, in layer order, until the budget holds
        ties = upto[n] - counts[n]
        if ties == 0:
            continue
        left = p.sizes[n] - counts[n]
        freed = np.asarray(p.costs.cost(n, left) - p.costs.cost(n, left - np.arange(1, ties + 1)))
        if kept - freed[-1] <= p.costs.limit:
            counts[n] += int(np.searchsorted(freed, kept - p.costs.limit, side="left")) + 1
            return counts
        counts[n] += ties
        kept -= int(freed[-1])
    raise AssertionError("the threshold's counts meet the budget")  # pragma: no cover


def _ranked_magnitude(w: torch.Tensor) -> np.ndarray:
    return torch.sort(w.abs()).values.numpy()


def _lamp_of_sorted(sq: torch.Tensor) -> torch.Tensor:
    """LAMP scores of squared weights sorted in increasing order."""
    tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])
    return torch.where(tail > 0, sq / tail.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(tail))


def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP score of each weight: w_u^2 / sum over weights at least as large of w_v^2 (0 for zeros)."""
    sq = w.double() ** 2
    order = torch.argsort(sq, stable=True)
    scores = torch.empty_like(sq)
    scores[order] = _lamp_of_sorted(sq[order])
    return scores


def _ranked_lamp(w: torch.Tensor) -> np.ndarray:
    # non-decreasing in exact arithmetic; the running max only irons out float rounding
    return np.maximum.accumulate(_lamp_of_sorted(torch.sort(w.double() ** 2).values).numpy())


def _glob(p: _Problem) -> dict[str, int]:
    """One global magnitude threshold."""
    return _global_threshold(p, _ranked_magnitude)


def _lamp(p: _Problem) -> dict[str, int]:
    """One global threshold on LAMP scores (Lee et al., ICLR'21)."""
    return _global_threshold(p, _ranked_lamp)


_METHODS = {"lamp": _lamp, "glob": _glob, "unif": _unif, "unifplus": _unifplus, "erk": _erk}
BASELINES: tuple[str, ...] = tuple(_METHODS)
"""The baseline methods, in the order users see them."""
