"""Exact per-layer allocation: pick one curve level per layer to minimise summed distortion under a budget.

This is a multiple-choice knapsack on the level grid. :func:`allocate` solves it exactly and fast
(Lagrangian bound, then an exact search over the few choices the bound leaves open, then an exact
fill of the budget along distortion plateaus); :func:`exact_dp_allocate` is the plain exact DP over
surviving-weight counts that it is checked and benchmarked against.

Conventions shared by both:

* Each curve is first replaced by its running maximum over increasing amounts, so pruning more
  never looks cheaper (a dipping worst-case curve cannot pull the result past the target).
* Cost of a level = what the budget counts: surviving weights ``n - round(a*n)``, or the layer's
  remaining FLOPs ``f * surviving / n``. Levels whose pruned count is below the layer's current
  number of zeros (``round(current*n)``) are not allowed: no layer gets denser.
* Several amounts can round to the same pruned count; of those only the smallest amount is a
  candidate (it has the smallest distortion after the running max).
* Ties. The objective is the float64 sum of the chosen distortions. Among optimal solutions the
  one with the largest total cost (most weights, or FLOPs, kept) wins; remaining ties go to the
  lexicographically smallest level indices in the order of ``curves`` (earlier layers less pruned).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Literal, Protocol

import numpy as np

from rdprune.core.grid import Curve

Budget = Literal["weights", "flops"]

_INT_LIMIT = 2**62  # total scaled cost must stay well inside int64
_LIMIT_SHARES = (0.125, 0.5, 1.0)  # search limits between the LP bound (0) and the incumbent (1)
_PARETO_FROM = 64  # below this many partial states, filtering costs more than it saves
# Caps of the exact tie fill: candidate intervals of one layer's step, and intervals kept over all
# steps of a call; past either, the fill is greedy (see allocate's step 2).
_FILL_STEP_LIMIT = 1_000_000
_FILL_TOTAL_LIMIT = 50_000


@dataclass(frozen=True)
class _Problem:
    """A validated instance on a padded ``(layers, levels)`` grid.

    ``valid[l, k]`` marks the levels that may be chosen; ``cost`` is integer (exactly the budget's
    unit, possibly scaled), ``dist`` the running-max distortion; both are meaningless where not valid.
    """

    names: list[str]
    amounts: list[np.ndarray]
    cost: np.ndarray
    dist: np.ndarray
    valid: np.ndarray
    budget: int


def _check_scalars(target_sparsity: float, budget: str, dense_weights: int, dense_flops: int) -> None:
    if not (isinstance(target_sparsity, (int, float)) and 0.0 <= target_sparsity < 1.0):
        raise ValueError(f"target_sparsity must be a number in [0, 1), got {target_sparsity!r}")
    if budget not in ("weights", "flops"):
        raise ValueError(f"budget must be 'weights' or 'flops', got {budget!r}")
    for name, value in (("dense_weights", dense_weights), ("dense_flops", dense_flops)):
        if not (isinstance(value, (int, np.integer)) and value >= 0):
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _layer_ints(names: list[str], values: Mapping[str, int] | None, what: str) -> np.ndarray:
    """``values[name]`` for every layer as positive ints, or a ValueError naming what is missing."""
    values = values or {}
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"{what} missing for layers {missing[:5]}; every curve needs its layer's {what} (a positive int)")
    out = np.array([values[n] if isinstance(values[n], (int, np.integer)) else -1 for n in names], dtype=np.int64)
    bad = [n for n, v in zip(names, out) if v <= 0]
    if bad:
        raise ValueError(f"{what} of layers {bad[:5]} must be positive ints, got {[values[n] for n in bad[:5]]}")
    return out


def _flops_scaling(sizes: np.ndarray, flops: np.ndarray) -> tuple[list[int], int] | None:
    """Integer multipliers ``m_l`` with ``m_l / Q = f_l / n_l`` exactly (Q = common denominator).

    Returns ``(m, Q)`` or ``None`` when exact scaled costs would not fit int64.
    """
    ratios = [Fraction(int(f), int(n)) for f, n in zip(flops, sizes)]
    q = math.lcm(*(r.denominator for r in ratios))
    if q * (int(flops.sum()) + 1) >= _INT_LIMIT:
        return None
    return [r.numerator * (q // r.denominator) for r in ratios], q


def _prepare(
    curves: Mapping[str, Curve],
    sizes: Mapping[str, int],
    target_sparsity: float,
    budget: Budget,
    flops: Mapping[str, int] | None,
    current: Mapping[str, float] | None,
    dense_weights: int,
    dense_flops: int,
) -> _Problem:
    """Validate the inputs and turn them into integer costs, running-max distortions and allowed levels.

    FLOPs costs are exact rationals ``f_l * surviving / n_l`` scaled by the common denominator Q of
    all ``f_l / n_l`` (Q = 1 in practice: a layer's FLOPs are a multiple of its weight count). Only
    if exact scaled costs would overflow int64, costs are rounded *up* to units of ``1/R`` FLOPs
    (R a power of two as large as fits) and the budget down, so the budget still holds exactly and
    the optimum is exact up to a budget shift of at most (number of layers)/R FLOPs.
    """
    _check_scalars(target_sparsity, budget, dense_weights, dense_flops)
    names = list(curves)
    if not names:
        raise ValueError("no curves given; allocate needs at least one layer's curve")
    n = _layer_ints(names, sizes, "sizes")
    amounts = [np.asarray(curves[name].amounts, np.float64) for name in names]
    dists = [np.asarray(curves[name].distortion, np.float64) for name in names]
    lengths = np.array([a.size for a in amounts])
    width = int(lengths.max())
    if all(a.ndim == 1 and a.shape == d.shape for a, d in zip(amounts, dists)) and (lengths == width).all():
        A, D = np.stack(amounts), np.stack(dists)
    else:
        A, D = np.ones((len(names), width)), np.zeros((len(names), width))
        for i, (a, d) in enumerate(zip(amounts, dists)):
            if a.ndim != 1 or a.shape != d.shape or a.size == 0:
                raise ValueError(f"curve of layer {names[i]!r} needs equal-length 1-d amounts and distortions")
            A[i, : a.size], D[i, : a.size], D[i, a.size :] = a, d, d[-1]
    in_range = np.arange(width)[None, :] < lengths[:, None]
    good = (np.diff(A, axis=1) > 0) | ~in_range[:, 1:]
    bad = ~good.all(axis=1) | (A[:, 0] < 0) | (A[np.arange(len(names)), lengths - 1] > 1)
    if bad.any():
        raise ValueError(f"curves of layers {[names[i] for i in np.nonzero(bad)[0][:5]]} need strictly increasing amounts in [0, 1]")
    if not np.isfinite(D).all():
        bad = [nm for nm, row in zip(names, D) if not np.isfinite(row).all()]
        raise ValueError(f"curves of layers {bad[:5]} contain NaN or inf distortions; distortions must be finite")
    D = np.maximum.accumulate(D, axis=1)

    pruned = np.floor(A * n[:, None] + 0.5).astype(np.int64)  # masks.pruned_count, vectorised
    surv = n[:, None] - pruned
    valid = in_range.copy()
    if current:
        zeros_now = np.zeros(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            c = current.get(name, 0.0)
            if not (isinstance(c, (int, float)) and math.isfinite(c) and 0.0 <= c <= 1.0):
                raise ValueError(f"current sparsity of layer {name!r} must be a fraction in [0, 1], got {c!r}")
            zeros_now[i] = math.floor(c * int(n[i]) + 0.5)
        valid &= pruned >= zeros_now[:, None]
        stuck = [nm for nm, row in zip(names, valid) if not row.any()]
        if stuck:
            raise ValueError(
                f"layers {stuck[:5]} have no curve level at or above their current sparsity; "
                "allowed: curves whose largest amount reaches the layer's current sparsity"
            )
    # Equal pruned counts: keep the first (smallest amount, smallest distortion after running max).
    valid[:, 1:] &= ~(in_range[:, :-1] & (pruned[:, 1:] == pruned[:, :-1]))

    if budget == "weights":
        total = int(n.sum()) + int(dense_weights)
        limit = math.floor((1.0 - target_sparsity) * total + 1e-9) - int(dense_weights)
        cost, unit = surv, "surviving weights"
    else:
        f = _layer_ints(names, flops, "flops")
        total_f = int(f.sum()) + int(dense_flops)
        remaining = Fraction((1.0 - target_sparsity) * total_f) - int(dense_flops)
        scaling = _flops_scaling(n, f)
        if scaling is not None:
            mult, q = scaling
            cost = surv * np.array(mult, dtype=np.int64)[:, None]
            limit = math.floor(remaining * q)
        else:
            r = 2 ** max(0, (_INT_LIMIT // (total_f + len(names))).bit_length() - 1)
            cost = np.array(
                [[-((-int(s) * int(fl) * r) // int(nl)) for s in row] for row, fl, nl in zip(surv, f, n)],
                dtype=np.int64,
            )
            limit = math.floor(remaining * r)
        unit = "remaining FLOPs (scaled)"
    cheapest = int(np.where(valid, cost, np.iinfo(np.int64).max).min(axis=1).sum())
    if cheapest > limit:
        raise ValueError(
            f"budget cannot be met: target_sparsity={target_sparsity} allows {limit} {unit} in the pruned layers "
            f"but their most-pruned allowed levels keep {cheapest}; allowed: a lower target or curves reaching higher amounts"
        )
    return _Problem(names, amounts, cost, D, valid, int(limit))


def _result(problem: _Problem, levels: np.ndarray) -> dict[str, float]:
    return {name: float(a[k]) for name, a, k in zip(problem.names, problem.amounts, levels.tolist())}


@dataclass
class SearchStats:
    """How much work one :func:`allocate` call did, counted in states rather than seconds.

    ``states``: partial solutions kept by the bound-pruned search over plateau choices, summed
    over layers and search limits. ``peak``: the most candidate partial solutions built in one
    step of that search (what its memory grows with). ``tie_intervals``: intervals of reachable
    extra cost stored by the budget fill along plateaus, summed over layers and optimal signatures.
    ``signatures``: optimal choices of plateaus (almost always 1).
    """

    states: int = 0
    peak: int = 0
    tie_intervals: int = 0
    signatures: int = 0
    greedy_fill: bool = False  # the tie fill gave up exactness of its secondary rule (see allocate)
    used: int = 0  # budget units the solution uses, as the solver counts them (scaled FLOPs or weights)
    budget: int = 0  # budget units allowed


def allocate(
    curves: Mapping[str, Curve],
    sizes: Mapping[str, int],
    target_sparsity: float,
    *,
    budget: Budget = "weights",
    flops: Mapping[str, int] | None = None,
    current: Mapping[str, float] | None = None,
    dense_weights: int = 0,
    dense_flops: int = 0,
) -> dict[str, float]:
    """Exact optimal per-layer amounts on the curves' level grids; returns ``{layer name: absolute amount}``.

    ``sizes`` are the layers' weight counts. ``budget="weights"`` keeps at most
    ``floor((1 - s) * (sum sizes + dense_weights) + 1e-9)`` weights in total, ``dense_weights``
    counting skipped layers that stay dense; ``budget="flops"`` keeps the remaining FLOPs
    ``sum_l flops_l * surviving_l / size_l + dense_flops`` at most ``(1 - s) * (sum flops + dense_flops)``.
    ``current`` gives layers' current sparsity: no level below it is chosen. Curves, ties and
    costs follow the module conventions. Raises ``ValueError`` for bad input or a budget no
    allowed levels meet.

    Method, and why it is exact. A *plateau* is a run of allowed levels of one layer with equal
    (running-max) distortion; its *bottom* is its most pruned, cheapest level. Every solution has
    the distortion of the solution that moves each layer to the bottom of its plateau, at no more
    cost. So the search runs in two steps:

    1. Plateau choice. The problem restricted to plateau bottoms (distortion strictly rising
       along each layer) is solved for *all* its optimal solutions, the optimal signatures. For
       any multiplier ``lam >= 0`` and any feasible choice ``x``,
       ``D(x) >= D(x) + lam * (C(x) - B) = LB + sum_l delta_l(x_l)`` with
       ``LB = sum_l min_k (d_lk + lam c_lk) - lam B`` and reduced costs
       ``delta_lk = d_lk + lam c_lk - min_k (d_lk + lam c_lk) >= 0``. Given any feasible incumbent
       of value ``UB``, every optimal solution satisfies ``sum_l delta_l(x_l) <= UB - LB``. So
       levels with ``delta > UB - LB`` are discarded, and so is any partial choice whose reduced
       costs already exceed the gap. ``lam`` is the LP-optimal multiplier (found greedily on the
       convex hulls of the layers' (cost, distortion) points), the incumbent is the LP's greedy
       rounding with the slack filled, and the gap is typically tiny, leaving few open choices.
       These are searched exactly by a DP over layers that keeps only Pareto-optimal partial
       states (cost, distortion): a state goes only if a state of no higher cost has strictly less
       distortion (equal states are all kept, so no optimal signature is lost). A small float
       tolerance is added to the gap so that rounding never discards an optimum.
    2. Budget fill. The optimal solutions are exactly the level choices inside an optimal
       signature's plateaus whose cost fits the budget. Per signature, with ``R`` the budget left
       at the bottoms, an exact DP over the extra cost of moving up the plateaus (suffix sets of
       reachable extra cost in ``[0, R]``, stored as integer intervals) gives the largest total
       cost, and a greedy pass over the layers in order, each taking its least-pruned level from
       which the rest can still reach exactly that cost, gives the lexicographically smallest
       levels. ``R`` is small: moving any layer that is not on its least-distorted plateau up to the
       next better plateau would lower the distortion, so it costs more than ``R``. Only when the
       optimum keeps every layer on its least-distorted plateau (the target is met without leaving,
       say, runs of zero distortion) is ``R`` unbounded; the fill is then a subset-sum over those
       plateaus (NP-hard in general). Its intervals are capped: past the cap the fill is greedy in
       layer order (each layer at its least-pruned tied level that fits). The distortion is still
       the exact optimum and the budget is met; only the secondary rule, most weights kept among
       the optimal solutions, may then be missed, by less than one level step of a layer.
    """
    return allocate_with_stats(
        curves,
        sizes,
        target_sparsity,
        budget=budget,
        flops=flops,
        current=current,
        dense_weights=dense_weights,
        dense_flops=dense_flops,
    )[0]


def allocate_with_stats(
    curves: Mapping[str, Curve],
    sizes: Mapping[str, int],
    target_sparsity: float,
    *,
    budget: Budget = "weights",
    flops: Mapping[str, int] | None = None,
    current: Mapping[str, float] | None = None,
    dense_weights: int = 0,
    dense_flops: int = 0,
) -> tuple[dict[str, float], SearchStats]:
    """:func:`allocate`, also returning the :class:`SearchStats` of the call (for tests and benchmarks)."""
    p = _prepare(curves, sizes, target_sparsity, budget, flops, current, dense_weights, dense_flops)
    stats = SearchStats()
    levels = _solve(p, stats)
    stats.used, stats.budget = int(p.cost[np.arange(len(levels)), levels].sum()), p.budget
    return _result(p, levels), stats


def _plateau_bottoms(p: _Problem) -> np.ndarray:
    """Mask of the allowed levels that are the most pruned of their plateau (equal running-max distortion)."""
    L, K = p.valid.shape
    # The next allowed level after each level (K where none); a level is a bottom unless that one
    # has the same distortion (the running max makes equal distortions contiguous).
    allowed_at = np.where(p.valid, np.arange(K), K)
    later = np.concatenate([allowed_at[:, 1:], np.full((L, 1), K)], axis=1)
    following = np.minimum.accumulate(later[:, ::-1], axis=1)[:, ::-1]
    next_dist = np.take_along_axis(np.concatenate([p.dist, np.full((L, 1), np.nan)], axis=1), following, axis=1)
    return p.valid & (next_dist != p.dist)


def _solve(p: _Problem, stats: SearchStats) -> np.ndarray:
    """Chosen level index per layer (see :func:`allocate` for the method and its proof)."""
    rows = np.arange(p.cost.shape[0])
    least = np.argmax(p.valid, axis=1)  # least-pruned allowed level: most cost, least distortion
    if int(p.cost[rows, least].sum()) <= p.budget:
        return least
    signatures = _optimal_bottoms(replace(p, valid=_plateau_bottoms(p)), stats)
    stats.signatures = len(signatures)
    filled = [_fill_plateaus(p, sig, stats) for sig in signatures]
    dearest = max(cost for cost, _ in filled)
    candidates = np.array([levels for cost, levels in filled if cost == dearest])
    return candidates[np.lexsort(candidates.T[::-1])[0]]


def _optimal_bottoms(p: _Problem, stats: SearchStats) -> np.ndarray:
    """All optimal solutions of ``p`` (rows of level indices); ``p`` has strictly rising distortion per layer."""
    L, K = p.cost.shape
    rows = np.arange(L)
    least = np.argmax(p.valid, axis=1)
    most = K - 1 - np.argmax(p.valid[:, ::-1], axis=1)
    if int(p.cost[rows, least].sum()) <= p.budget:
        return least[None, :]  # every other choice has strictly more distortion
    steps = _hull_steps(p, most)
    levels = _incumbent(p, steps, most)
    d = np.where(p.valid, p.dist, 0.0)
    upper = float(d[rows, levels].sum())
    tol = 1e-9 * float(np.abs(d).max(axis=1).sum())
    # Bound of choosing level k for layer l: d_lk plus the LP bound of all other layers with the
    # budget that is left. A level whose bound exceeds the incumbent cannot be optimal. Row L is
    # all layers together: the LP bound of the whole problem.
    all_cost, all_dist = int(p.cost[rows, most].sum()), float(d[rows, most].sum())
    mask = np.ones((L + 1, steps.layer.size), dtype=bool)
    mask[:L] = steps.layer[None, :] != rows[:, None]
    base_cost = np.append(all_cost - p.cost[rows, most], all_cost)
    base_dist = np.append(all_dist - d[rows, most], all_dist)
    x, y = _lp_breakpoints(steps, mask, base_cost, base_dist)
    queries = np.vstack([p.budget - p.cost, np.full((1, K), p.budget)])
    lp = _lp_rows(x, y, queries)
    bound, lower = d + lp[:L], float(lp[L, 0])
    # Search below ever higher limits: a solution found within a limit is optimal (every solution
    # at or below the limit is enumerated), and low limits leave far fewer open choices.
    for share in _LIMIT_SHARES:
        limit = lower + share * (upper - lower) + tol
        open_ = p.valid & (bound <= limit)
        if share == 1.0:
            open_[rows, levels] = True  # the incumbent always qualifies; this guards rounding
        found = _search(p, open_, steps, most, limit, stats)
        if found is not None:
            return found
    raise AssertionError("the incumbent satisfies the last limit")  # unreachable: see share == 1.0


def _fill_plateaus(p: _Problem, bottoms: np.ndarray, stats: SearchStats) -> tuple[int, np.ndarray]:
    """Largest total cost within the budget on the plateaus of ``bottoms``, and its lexicographically smallest levels.

    Extra cost of a level = its cost minus its plateau bottom's. Suffix sets (extra cost reachable
    by the layers after each tied layer, within ``room``) are sorted disjoint integer intervals.
    """
    rows = np.arange(p.cost.shape[0])
    base = p.cost[rows, bottoms]
    room = p.budget - int(base.sum())
    extra = p.cost - base[:, None]
    option = p.valid & (p.dist == p.dist[rows, bottoms][:, None]) & (extra <= room)
    tied = np.nonzero(option.sum(axis=1) > 1)[0].tolist()
    after: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    lo = hi = np.zeros(1, dtype=np.int64)
    for layer in reversed(tied):
        after[layer] = lo, hi
        if lo.size * int(option[layer].sum()) > _FILL_STEP_LIMIT or stats.tie_intervals > _FILL_TOTAL_LIMIT:
            return _greedy_fill(p, bottoms, option, extra, tied, room, stats)
        lo, hi = _sumset(lo, hi, extra[layer, option[layer]], room)
        stats.tie_intervals += lo.size
    reach = int(hi[-1])
    levels = bottoms.copy()
    left = reach
    for layer in tied:
        lo, hi = after[layer]
        ks = np.nonzero(option[layer])[0]  # least pruned first: most extra cost first
        need = left - extra[layer, ks]
        i = np.searchsorted(lo, need, side="right") - 1
        fits = (need >= 0) & (i >= 0) & (need <= hi[np.maximum(i, 0)])
        k = ks[np.argmax(fits)]  # some level fits: ``left`` is reachable from here
        levels[layer] = k
        left -= int(extra[layer, k])
    if left:
        raise AssertionError("the budget fill lost track of its reachable cost")  # unreachable
    return int(base.sum()) + reach, levels


def _greedy_fill(
    p: _Problem, bottoms: np.ndarray, option: np.ndarray, extra: np.ndarray, tied: list[int], room: int,
    stats: SearchStats,
) -> tuple[int, np.ndarray]:
    """The budget fill when the exact one would be a large subset-sum: layers in order, each at its
    least-pruned tied level that still fits. Same (optimal) distortion, within the budget; the
    total cost is as large as this greedy order makes it, not necessarily the largest."""
    stats.greedy_fill = True
    levels = bottoms.copy()
    left = room
    for layer in tied:
        ks = np.nonzero(option[layer] & (extra[layer] <= left))[0]
        levels[layer] = ks[0]  # least pruned first; the bottom (extra 0) always fits
        left -= int(extra[layer, ks[0]])
    return p.budget - left, levels


def _sumset(lo: np.ndarray, hi: np.ndarray, add: np.ndarray, room: int) -> tuple[np.ndarray, np.ndarray]:
    """``{x + a : x in [lo_i, hi_i], a in add} ∩ [0, room]`` as sorted, disjoint, non-adjacent intervals."""
    start = (lo[:, None] + add[None, :]).ravel()
    end = np.minimum((hi[:, None] + add[None, :]).ravel(), room)
    inside = start <= room
    start, end = start[inside], end[inside]
    order = np.argsort(start)
    start, end = start[order], np.maximum.accumulate(end[order])
    opens = np.ones(start.size, dtype=bool)
    opens[1:] = start[1:] > end[:-1] + 1
    first = np.nonzero(opens)[0]
    last = np.append(first[1:], start.size) - 1
    return start[first], end[last]


@dataclass(frozen=True)
class _Steps:
    """Hull steps of all layers, in order of decreasing efficiency (distortion saved per unit cost).

    Step ``i`` moves ``layer[i]`` up its convex hull to the less-pruned level ``to[i]``, adding
    ``cost[i] > 0`` and saving ``saved[i] >= 0`` distortion. Taking steps in this order from the
    most-pruned levels traces the LP relaxation's optimum as the budget grows (Sinha-Zoltners).
    """

    layer: np.ndarray
    to: np.ndarray
    cost: np.ndarray
    saved: np.ndarray


def _hull_steps(p: _Problem, most: np.ndarray) -> _Steps:
    """The layers' lower convex hulls of (cost, distortion), as steps sorted by efficiency.

    Level k beats every less-pruned level for multipliers ``lam >= lo_k`` and every more-pruned
    one for ``lam <= hi_k`` (``lam`` prices a unit of cost), so it is a hull vertex iff
    ``lo_k < hi_k``; the step onto vertex k's less-pruned neighbour has efficiency ``lo_k``.
    """
    L, K = p.cost.shape
    V = p.valid
    d = np.where(V, p.dist, 0.0)
    c = p.cost.astype(np.float64)
    pair = V[:, :, None] & V[:, None, :] & np.triu(np.ones((K, K), dtype=bool), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (d[:, None, :] - d[:, :, None]) / (c[:, :, None] - c[:, None, :])  # [l, i, j]: lam where j ties i
    lo = np.where(pair, slope, -np.inf).max(axis=1)
    hi = np.where(pair, slope, np.inf).min(axis=2)
    vertex = V & (lo < hi)
    idx = np.where(vertex, np.arange(K), -1)
    prev = np.maximum.accumulate(np.concatenate([np.full((L, 1), -1), idx[:, :-1]], axis=1), axis=1)
    layer, level = np.nonzero(vertex & (prev >= 0))
    to = prev[layer, level]
    order = np.lexsort((layer, -lo[layer, level]))  # within a layer, lo grows with the level
    layer, level, to = layer[order], level[order], to[order]
    return _Steps(layer, to, p.cost[layer, to] - p.cost[layer, level], p.dist[layer, level] - p.dist[layer, to])


def _incumbent(p: _Problem, steps: _Steps, most: np.ndarray) -> np.ndarray:
    """A good feasible solution: hull steps in efficiency order while they fit, then any later that fit."""
    levels = most.copy()
    slack = p.budget - int(p.cost[np.arange(len(most)), most].sum())
    crit = int(np.searchsorted(np.cumsum(steps.cost), slack, side="right"))
    taken = slice(0, crit)
    np.minimum.at(levels, steps.layer[taken], steps.to[taken])
    slack -= int(steps.cost[taken].sum())
    blocked = np.zeros(len(most), dtype=bool)
    for layer, to, cost in zip(steps.layer[crit:].tolist(), steps.to[crit:].tolist(), steps.cost[crit:].tolist()):
        if blocked[layer]:
            continue
        if cost <= slack:
            slack -= cost
            levels[layer] = to
        else:
            blocked[layer] = True  # a layer's later steps build on this one
    return levels


def _lp_breakpoints(steps: _Steps, mask: np.ndarray, base_cost: np.ndarray, base_dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints (cost, LP optimum) of the LP relaxation of each layer set in the rows of ``mask``.

    Row r's layers start at their most-pruned levels (``base_cost[r]``, ``base_dist[r]``) and take
    their hull steps (``mask[r]`` selects them) in efficiency order, the last one fractionally.
    Returns float arrays ``x`` (non-decreasing along each row) and ``y``, one column per step plus one.
    """
    R = mask.shape[0]
    x = np.empty((R, mask.shape[1] + 1))
    y = np.empty_like(x)
    x[:, 0], y[:, 0] = base_cost, base_dist
    np.cumsum(np.where(mask, steps.cost, 0), axis=1, out=x[:, 1:])
    np.cumsum(np.where(mask, steps.saved, 0.0), axis=1, out=y[:, 1:])
    x[:, 1:] += x[:, :1]
    np.subtract(y[:, :1], y[:, 1:], out=y[:, 1:])
    return x, y


def _lp_rows(x: np.ndarray, y: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Row r's LP optimum (breakpoints ``x[r]``, ``y[r]``) at each budget in ``budget[r]``, in one interpolation.

    The rows are shifted apart along the cost axis so that one ``np.interp`` over the flattened
    breakpoints serves them all; budgets are clipped into their row's range first (beyond the last
    breakpoint the LP stays at its last value) and are inf where even the cheapest choice overruns.
    """
    first, last = x[:, :1], x[:, -1:]
    span = float((last - first).max()) + 1.0
    shift = np.arange(x.shape[0])[:, None] * span - first
    out = np.interp((np.minimum(budget, last) + shift).ravel(), (x + shift).ravel(), y.ravel())
    out = out.reshape(budget.shape)
    out[budget < first] = np.inf
    return out


def _pareto(keep: np.ndarray, cost: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """The candidates in ``keep`` (ascending) that no other one beats, still in ascending order.

    A state goes if one of no higher cost has strictly less distortion: such a state cannot start
    an optimal solution. States equal in both stay, since they may lie on different plateaus.
    """
    keep = keep[np.lexsort((dist[keep], cost[keep]))]
    kc, kd = cost[keep], dist[keep]
    last = np.append(kc[1:] != kc[:-1], True)  # last state of each cost
    group = np.concatenate([[0], np.cumsum(last[:-1])])
    best = np.minimum.accumulate(kd)[np.nonzero(last)[0]][group]  # least distortion at no higher cost
    return np.sort(keep[kd <= best])


def _search(
    p: _Problem, open_: np.ndarray, steps: _Steps, most: np.ndarray, limit: float, stats: SearchStats
) -> np.ndarray | None:
    """Exact DP over the open choices: all optimal solutions of distortion at most ``limit`` (rows), or ``None``.

    A partial state (cost C, distortion D) survives only if D plus the LP bound of the layers still
    to decide, at budget B - C, is at most ``limit``; many states are pruned further by Pareto
    dominance.
    """
    L, _ = p.cost.shape
    n_open = open_.sum(axis=1)
    if not n_open.all():
        return None
    free = np.nonzero(n_open > 1)[0]
    fixed = np.nonzero(n_open == 1)[0]
    levels = np.argmax(open_, axis=1)  # free layers' entries are overwritten below
    start_dist = 0.0
    for value in p.dist[fixed, levels[fixed]].tolist():
        start_dist += value
    start_cost = int(p.cost[fixed, levels[fixed]].sum())
    if free.size == 0:
        return levels[None, :] if start_cost <= p.budget and start_dist <= limit else None
    # Row t: the free layers after the t-th, whose LP bounds the states after deciding the t-th.
    position = np.full(L, -1)
    position[free] = np.arange(free.size)
    later = position[steps.layer][None, :] > np.arange(free.size)[:, None]
    later_cost = np.cumsum(p.cost[free, most[free]][::-1])[::-1]
    later_dist = np.cumsum(p.dist[free, most[free]][::-1])[::-1]
    xs, ys = _lp_breakpoints(steps, later, np.append(later_cost[1:], 0), np.append(later_dist[1:], 0.0))
    choice_layer, choice_level = np.nonzero(open_[free])
    choice_cost = p.cost[free[choice_layer], choice_level]
    choice_dist = p.dist[free[choice_layer], choice_level]
    ends = np.cumsum(n_open[free]).tolist()
    pieces = list(zip([0, *ends[:-1]], ends))
    options = [choice_level[a:b] for a, b in pieces]
    option_cost = [choice_cost[a:b] for a, b in pieces]
    option_dist = [choice_dist[a:b] for a, b in pieces]

    cost = np.array([start_cost], dtype=np.int64)
    dist = np.array([start_dist])
    trail = []
    for t in range(free.size):
        cand_cost = (cost[:, None] + option_cost[t]).ravel()
        cand_dist = (dist[:, None] + option_dist[t]).ravel()
        stats.peak = max(stats.peak, cand_cost.size)
        rest = np.interp(p.budget - cand_cost, xs[t], ys[t], left=np.inf)
        keep = np.flatnonzero(cand_dist + rest <= limit)
        if keep.size == 0:
            return None
        if keep.size > _PARETO_FROM:
            keep = _pareto(keep, cand_cost, cand_dist)
        stats.states += keep.size
        cost, dist = cand_cost[keep], cand_dist[keep]
        trail.append(keep)
    state = np.nonzero(dist == dist.min())[0]
    found = np.tile(levels, (state.size, 1))
    for t in range(free.size - 1, -1, -1):
        state, option = np.divmod(trail[t][state], options[t].size)
        found[:, free[t]] = options[t][option]
    return found


def exact_dp_allocate(
    curves: Mapping[str, Curve],
    sizes: Mapping[str, int],
    target_sparsity: float,
    *,
    current: Mapping[str, float] | None = None,
    dense_weights: int = 0,
) -> dict[str, float]:
    """Reference: the plain exact DP over the count of surviving weights (a weights budget).

    ``best[b]`` is the least distortion of the layers so far keeping exactly ``b`` weights,
    ``0 <= b <= budget``; each layer relaxes it once per level, vectorised over ``b``. Time and
    memory grow with (layers x levels x budget), which is why :func:`allocate` exists. Same
    conventions, validation and meaning of ``current`` and ``dense_weights`` as
    :func:`allocate` with ``budget="weights"``; ties go to the largest kept count.
    """
    p = _prepare(curves, sizes, target_sparsity, "weights", None, current, dense_weights, 0)
    width = p.budget + 1
    best = np.full(width, np.inf)
    best[0] = 0.0
    choices = []
    for layer in range(len(p.names)):
        new = np.full(width, np.inf)
        choice = np.zeros(width, dtype=np.int16)
        for k in np.nonzero(p.valid[layer])[0].tolist():
            c = int(p.cost[layer, k])
            if c >= width:
                continue
            cand = best[: width - c] + p.dist[layer, k]
            better = cand < new[c:]
            new[c:][better] = cand[better]
            choice[c:][better] = k
        best = new
        choices.append(choice)
    b = width - 1 - int(np.argmin(best[::-1]))  # largest kept count among the least distortions
    levels = np.zeros(len(p.names), dtype=np.int64)
    for layer in range(len(p.names) - 1, -1, -1):
        levels[layer] = choices[layer][b]
        b -= int(p.cost[layer, levels[layer]])
    return _result(p, levels)


def allocate_levels(
    curves: Mapping[str, Curve], costs: Mapping[str, np.ndarray], limit: int, *, first: Mapping[str, int] | None = None
) -> tuple[dict[str, int], SearchStats]:
    """Exact level choice for units whose levels carry explicit integer costs; returns ``{unit: level index}``.

    Minimises the summed (running-max) distortion subject to ``sum cost <= limit``, with the ties
    and the method of :func:`allocate`. ``costs[name][k]`` is the cost of level ``k``, a non-negative
    int that must not rise along the levels (a more pruned level never costs more); levels below
    ``first[name]`` are not allowed. This is the entry for units whose cost is not a weight count,
    e.g. channel groups under a linearised latency budget.
    """
    names = list(curves)
    if not names:
        raise ValueError("no curves given; allocate_levels needs at least one unit's curve")
    width = max(np.asarray(curves[n].amounts).size for n in names)
    L = len(names)
    cost = np.zeros((L, width), np.int64)
    dist = np.zeros((L, width))
    valid = np.zeros((L, width), bool)
    for i, n in enumerate(names):
        d = np.maximum.accumulate(np.asarray(curves[n].distortion, np.float64))
        c = np.asarray(costs[n])
        if c.shape != d.shape or not np.issubdtype(c.dtype, np.integer) or (c < 0).any() or (np.diff(c) > 0).any():
            raise ValueError(f"costs of unit {n!r} must be non-negative ints, one per level, never rising along the levels")
        k = d.size
        cost[i, :k], cost[i, k:] = c, c[-1]
        dist[i, :k], dist[i, k:] = d, d[-1]
        start = (first or {}).get(n, 0)
        valid[i, start:k] = True
        valid[i, start + 1:k] &= c[start + 1:] != c[start:-1]  # equal cost: only the first (least distortion) is a candidate
    if not valid.any(axis=1).all():
        raise ValueError("every unit needs at least one allowed level")
    cheapest = int(np.where(valid, cost, np.iinfo(np.int64).max).min(axis=1).sum())
    if cheapest > limit:
        raise ValueError(f"budget cannot be met: it allows {limit} but the most pruned allowed levels cost {cheapest}")
    p = _Problem(names, [np.asarray(curves[n].amounts, np.float64) for n in names], cost, dist, valid, int(limit))
    stats = SearchStats()
    levels = _solve(p, stats)
    stats.used, stats.budget = int(p.cost[np.arange(L), levels].sum()), p.budget
    return dict(zip(names, (int(k) for k in levels))), stats


def predicted_distortion(curves: Mapping[str, Curve], levels: Mapping[str, int]) -> float:
    """What an allocation predicts and minimises: the sum over units of the chosen level's distortion, each curve
    taken as its running maximum (a dip after a higher level is never believed). ``levels`` indexes each curve."""
    return float(sum(np.maximum.accumulate(np.asarray(curves[n].distortion, np.float64))[k] for n, k in levels.items()))


class Cost(Protocol):
    """What a choice costs under one budget, the protocol every granularity's cost follows.

    ``budget`` names what is counted (weights, flops, latency, layers); ``total`` is the dense
    model's cost, the unit of ``prune.target_sparsity``; calling it with a choice (in the
    granularity's terms) gives the whole model's cost under that choice.
    """

    budget: str

    @property
    def total(self) -> float: ...

    def __call__(self, choice: Any) -> float: ...


@dataclass
class Allocation:
    """What an allocation chose and what it knows about the choice, for every granularity.

    ``choice`` is in the granularity's terms: channels removed per group, the layers made 2:4.
    """

    choice: Any
    cost: float  # of the whole model under the choice, in the budget's unit
    limit: float  # the budget it met
    distortion: float | None  # predicted: :func:`predicted_distortion` of the chosen levels (None for baselines)
    lower_bound: float | None = None  # of the distortion over every choice on the grid that meets the budget
    rounds: int = 0  # solve rounds (linearise-and-solve, relinearisation and repair)
    greedy_steps: int = 0  # steps of a last-resort greedy repair and of the final fill
    history: list[float] = field(default_factory=list)  # true cost after each round

    @property
    def gap(self) -> float | None:
        return None if self.lower_bound is None or self.distortion is None else self.distortion - self.lower_bound

    def _renamed(self, old: str) -> Any:
        warnings.warn(f"Allocation.{old} is deprecated; use Allocation.choice", DeprecationWarning, stacklevel=3)
        return self.choice

    @property
    def removal(self) -> Any:
        """Deprecated: :attr:`choice` (channels removed per group)."""
        return self._renamed("removal")

    @property
    def layers(self) -> Any:
        """Deprecated: :attr:`choice` (the layers made 2:4)."""
        return self._renamed("layers")
