"""Allocation of channel removals under a non-separable budget: linearise, solve exactly, repeat, repair.

The exact allocator (:func:`rdprune.core.allocation.allocate_levels`) needs a cost per unit and
level that adds up. A channel removal's cost does not (see :mod:`rdprune.granularity.channel.costs`), so:

1. **Linearise** around the current choice x: group g at level n costs ``C(x with g at n) - C(x)``
   (made non-rising along the levels), and the budget left is ``B - C(x)``.
2. **Solve** that separable problem exactly; move x to its solution; repeat until x does not move
   (or ``rounds`` are spent, or a choice comes back: a cycle).
3. **Repair**: while the true cost C(x) exceeds B, tighten the linearised budget by the excess and
   re-solve (at most ``rounds`` times); then, if still over, step the group whose next level loses
   the least distortion per unit of cost saved, until the budget holds.

What is exact: each linearised problem is solved to optimality on the level grid, and the budget
holds for the true cost. What is not: the result is a fixed point of this iteration, not a proven
optimum of the non-separable problem. For weights and FLOPs, :func:`allocate_channels` also solves
the separable McCormick relaxation exactly, whose optimum is a lower bound on the best distortion
any removal on the grid can reach: the reported gap bounds how far from optimal the result is.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from rdprune.core.allocation import Allocation, allocate_levels, predicted_distortion
from rdprune.core.curves import UnitPlan
from rdprune.core.grid import Curve
from rdprune.granularity.channel.costs import ChannelCost

log = logging.getLogger(__name__)

_RESOLUTION = 2**40  # integer cost units per budget: rounding moves a level's cost by at most 2^-40 of the budget
_CORRECTION_MARGIN = 0.01  # each latency correction aims this much lower than the last overshoot asks
_CORRECTION_FLOOR = 0.8  # the most one latency correction scales the model's limit down


def _running_max(curve: Curve) -> np.ndarray:
    return np.maximum.accumulate(np.asarray(curve.distortion, np.float64))


def _solve_linear(curves: Mapping[str, Curve], costs: Mapping[str, np.ndarray], left: float, limit: float,
                  first: Mapping[str, int]) -> dict[str, int] | None:
    """Exact solution of one separable problem with float costs (``left``: budget available), or None if none fits."""
    unit = limit / _RESOLUTION
    shifted = {g: np.minimum.accumulate(c) for g, c in costs.items()}
    base = sum(float(c[first[g]:].min()) for g, c in shifted.items())
    ints = {g: np.ceil((c - c[first[g]:].min()) / unit).clip(min=0).astype(np.int64) for g, c in shifted.items()}
    room = math.floor((left - base) / unit)
    if room < 0:
        return None
    for g, c in ints.items():  # levels below ``first`` are not allowed; keep the array non-rising for the solver
        c[: first[g]] = c[first[g]]
    levels, _ = allocate_levels(curves, ints, room, first=first)
    return levels


def allocate_channels(
    curves: Mapping[str, Curve],
    plans: Mapping[str, UnitPlan],
    cost: ChannelCost,
    limit: float,
    *,
    rounds: int = 8,
) -> Allocation:
    """Channels to remove per group so that ``cost`` stays within ``limit``, at least distortion (module notes).

    ``plans[g].counts[k]`` is the number of channels level k of ``curves[g]`` removes, ``plans[g].zeros``
    the number removed now (no level below it is chosen). Raises ``ValueError`` when even every group
    at its most pruned level costs more than ``limit``.
    """
    groups = list(curves)
    missing = [g for g in groups if g not in plans]
    if missing:
        raise ValueError(f"no level plan for channel groups {missing[:5]}: give group_plan(space, g, levels, grid) for every curve")
    mismatched = {g: (len(plans[g].counts), len(curves[g].amounts)) for g in groups
                  if len(plans[g].counts) != len(curves[g].amounts)}
    if mismatched:
        g, (planned, measured) = next(iter(mismatched.items()))
        raise ValueError(f"the level plan of channel group {g!r} has {planned} levels but its curve has {measured}: build the "
                         "plans with the levels and grid the curves were estimated with (and on the same, unchanged model)")
    counts = {g: np.asarray(plans[g].counts) for g in groups}
    first = {g: int(np.searchsorted(counts[g], plans[g].zeros)) for g in groups}
    most = {g: int(counts[g][-1]) for g in groups}
    if cost(most) > limit:
        raise ValueError(f"budget cannot be met: every group at its most pruned level costs {cost(most):.6g} "
                         f"but the budget is {limit:.6g}")
    dist = {g: _running_max(curves[g]) for g in groups}
    level = dict(first)

    def removal(levels: Mapping[str, int]) -> dict[str, int]:
        return {g: int(counts[g][levels[g]]) for g in groups}

    def linearised(levels: Mapping[str, int]) -> tuple[dict[str, np.ndarray], float]:
        now = removal(levels)
        here = cost(now)
        return {g: np.array([cost({**now, g: int(n)}) - here for n in counts[g]]) for g in groups}, here

    most_levels = {g: len(counts[g]) - 1 for g in groups}

    def step(levels: Mapping[str, int], shortfall: float) -> tuple[dict[str, int], float]:
        """Solve the problem linearised at ``levels`` with ``shortfall`` held back; (solution, its linear prediction)."""
        costs, here = linearised(levels)
        moved = _solve_linear(curves, costs, limit - shortfall - here, limit, first) or most_levels
        return moved, here + sum(float(costs[g][moved[g]]) for g in groups)

    history, used, shortfall = [cost(removal(level))], 0, 0.0
    if history[0] > limit:
        seen = {tuple(level.values())}
        for _ in range(rounds):  # relinearise until the choice stands still
            used += 1
            moved, predicted = step(level, 0.0)
            history.append(cost(removal(moved)))
            shortfall = max(0.0, history[-1] - predicted)  # what the linear model missed on this step
            stuck = moved == level or tuple(moved.values()) in seen
            seen.add(tuple(moved.values()))
            level = moved
            if stuck:
                break
        for _ in range(rounds):  # repair: hold back what the last step's linear model missed
            if history[-1] <= limit:
                break
            used += 1
            level, predicted = step(level, shortfall)
            history.append(cost(removal(level)))
            shortfall = max(shortfall, history[-1] - predicted)
    greedy = 0
    while cost(removal(level)) > limit:  # last resort; ends: the most pruned removal fits
        greedy += 1
        now = removal(level)
        here = cost(now)
        best, best_rate = None, math.inf
        for g in groups:
            k = level[g]
            if k + 1 < len(counts[g]):
                saved = here - cost({**now, g: int(counts[g][k + 1])})
                rate = (dist[g][k + 1] - dist[g][k]) / saved if saved > 0 else math.inf
                if best is None or rate < best_rate:
                    best, best_rate = g, rate
        level[best] += 1
    greedy += _fill(level, first, removal, cost, dist, limit)
    chosen = removal(level)
    bound = _lower_bound(curves, counts, first, cost, limit, chosen) if cost.has_lower_bound else None
    return Allocation(
        choice=chosen, cost=cost(chosen), limit=limit, distortion=predicted_distortion(curves, {g: level[g] for g in groups}),
        lower_bound=bound, rounds=used, greedy_steps=greedy, history=history,
    )


def _fill(level: dict[str, int], first: Mapping[str, int], removal: Callable[[Mapping[str, int]], dict[str, int]],
          cost: ChannelCost, dist: Mapping[str, np.ndarray], limit: float) -> int:
    """Give back what the budget leaves: step groups one level less pruned, largest distortion saved first, while it fits.

    Linearisation and repair can stop under the budget; this never raises the distortion. Returns the steps taken.
    """
    steps = 0
    while True:
        best, best_gain = None, 0.0
        for g, k in level.items():
            gain = dist[g][k] - dist[g][k - 1] if k > first[g] else 0.0
            if gain > best_gain and cost(removal({**level, g: k - 1})) <= limit:
                best, best_gain = g, gain
        if best is None:
            return steps
        level[best] -= 1
        steps += 1


def _lower_bound(curves: Mapping[str, Curve], counts: Mapping[str, np.ndarray], first: Mapping[str, int],
                 cost: ChannelCost, limit: float, anchor: Mapping[str, int]) -> float:
    """Optimal distortion of the McCormick relaxation: no removal on the grid meeting the budget does better.

    Integer rounding of the relaxed costs goes down (and the budget up), so the relaxation stays a
    relaxation; its solution's distortion is then at or below the true optimum.
    """
    zero = cost.lower_bound({}, anchor)
    base = zero
    unit = limit / _RESOLUTION
    ints = {}
    for g, c in counts.items():
        slope = np.array([cost.lower_bound({g: int(n)}, anchor) - zero for n in c])  # affine: groups add up exactly
        lowest = slope[first[g]:].min()
        arr = np.floor((np.minimum.accumulate(slope) - lowest) / unit).clip(min=0).astype(np.int64)
        arr[: first[g]] = arr[first[g]]
        ints[g] = arr
        base += lowest
    room = math.ceil((limit - base) / unit) + len(counts)
    levels, _ = allocate_levels(curves, ints, room, first=first)
    return predicted_distortion(curves, levels)


@dataclass
class MeasuredLatency:
    """A removal checked against the latency measured on the device, and how the latency model did."""

    removal: dict[str, int]
    predicted_s: float  # the latency model's prediction for the first solution, before any correction
    predicted_dense_s: float  # the latency model's dense latency (the table's; with a fit, the dense model measured for it)
    first_s: float  # measured latency of that first solution
    first_dense_s: float  # measured dense latency, timed together with it
    dense_s: float  # measured dense latency, timed together with the final removal
    pruned_s: float  # measured latency of the final removal
    corrections: int
    offset_s: float  # the fit of the latency model to measurement: prediction = offset + scale x table
    scale: float
    table_s: float  # the table's own prediction for the first solution, before the fit
    table_dense_s: float

    @property
    def table_error(self) -> float:
        """:attr:`model_error` of the table alone, before the fit to measurement (equal to it without a fit)."""
        return (self.table_s / self.table_dense_s) / (self.first_s / self.first_dense_s) - 1.0

    @property
    def model_error(self) -> float:
        """Relative error of the predicted fraction of the dense latency, before correction.

        The budget is a fraction of the dense latency, so this is the error that decides whether
        it is met; it is also what a change of machine load between building the table and
        measuring does not move.
        """
        return (self.predicted_s / self.predicted_dense_s) / (self.first_s / self.first_dense_s) - 1.0

    @property
    def absolute_error(self) -> float:
        """Relative error of the predicted seconds against the measured ones, before correction."""
        return self.predicted_s / self.first_s - 1.0

    @property
    def speedup(self) -> float:
        return self.dense_s / self.pruned_s


def _against_budget(measured_s: float, budget_s: float) -> str:
    """"12.300 ms against a budget of 12.500 ms (met)", or "(over by 3.1 %)"."""
    verdict = "met" if measured_s <= budget_s else f"over by {100 * (measured_s / budget_s - 1):.1f} %"
    return f"{1e3 * measured_s:.3f} ms against a budget of {1e3 * budget_s:.3f} ms ({verdict})"


def meet_measured_latency(
    solve: Callable[[float], dict[str, int]],
    measure: Callable[[dict[str, int]], tuple[float, float]],
    predict: Callable[[dict[str, int]], float],
    predicted_dense: float,
    keep: float,
    rounds: int,
    reference: dict[str, int] | None = None,
) -> MeasuredLatency:
    """Solve at ``keep`` times the predicted dense latency, measure, and re-solve while the measurement is over budget.

    ``measure(removal)`` returns measured (dense, pruned) seconds, timed together; the budget is
    ``keep`` times the measured dense latency. Correction k scales the latency model's limit by
    ``budget / measured`` (but by no less than 0.8) and by ``1 - 0.01 k`` (at most ``rounds``
    times): the model's relative error is what it corrects, the margin what timing noise would
    leave, the floor what one timing disturbed by other load would otherwise over-correct.

    With a ``reference`` removal (e.g. a uniform one near the budget), the model is first fitted to
    measurement: the dense model and the reference are timed together and the prediction becomes
    ``offset + scale x table`` through those two points. The table times layers one by one; the
    offset takes what it cannot see (per-call overhead, the layers it does not time), the scale a
    runtime that runs the whole graph faster or slower than its layers alone.
    """
    offset, scale = 0.0, 1.0
    if reference is not None:
        offset, scale = _fit(predict(reference), predicted_dense, *measure(reference), keep)
    table_dense = predicted_dense
    limit = keep * (offset + scale * table_dense)  # in the fitted model's seconds; the table's is (limit - offset) / scale
    try:
        removal = solve((limit - offset) / scale)
    except ValueError:
        if (offset, scale) == (0.0, 1.0):
            raise
        log.warning("the latency model fitted to measurement puts the budget out of reach (a fixed %.3f ms of %.3f ms); "
                    "solving on the table as it is, the measurement decides", 1e3 * offset, 1e3 * limit / keep)
        offset, scale, limit = 0.0, 1.0, keep * table_dense
        removal = solve(limit)
    predicted_dense = offset + scale * table_dense
    table = predict(removal)
    predicted = offset + scale * table
    dense_s, pruned_s = measure(removal)
    first_dense_s, first_s, done = dense_s, pruned_s, 0
    log.info("latency check: the chosen model measures %s", _against_budget(pruned_s, keep * dense_s))
    while pruned_s > keep * dense_s and done < rounds:
        done += 1
        # Scale by the overshoot, and aim a little lower each round: timing noise of a percent or
        # two would otherwise leave a near miss over budget round after round. One round never cuts
        # more than _CORRECTION_FLOOR: on a loaded machine a single noisy timing must not halve the model.
        limit *= max(keep * dense_s / pruned_s, _CORRECTION_FLOOR) * (1.0 - _CORRECTION_MARGIN * done)
        try:
            if limit <= offset:
                raise ValueError("the tightened budget is below the fitted model's offset")
            candidate = solve((limit - offset) / scale)
        except ValueError:
            log.warning("latency correction %d: no removal meets the tightened budget; keeping the last one", done)
            break
        removal = candidate
        dense_s, pruned_s = measure(removal)
        log.info("latency correction %d (the last model was over budget): re-solved, the new one measures %s",
                 done, _against_budget(pruned_s, keep * dense_s))
    if pruned_s > keep * dense_s:
        log.warning("measured latency %.3f ms is over the budget %.3f ms after %d corrections", 1e3 * pruned_s, 1e3 * keep * dense_s, done)
    return MeasuredLatency(removal, predicted, predicted_dense, first_s, first_dense_s, dense_s, pruned_s, done,
                           offset, scale, table, table_dense)


def _fit(table_reference: float, table_dense: float, dense_s: float, reference_s: float, keep: float) -> tuple[float, float]:
    """(offset, scale) of the line through (table, measured) at the dense model and the reference; (0, 1), the table
    as it is, where the two points cannot define a usable line (a reference no faster in the table or when measured,
    or a line whose offset alone would exceed the budget)."""
    if table_dense <= table_reference or dense_s <= reference_s:
        log.warning("latency model fit skipped: the reference removal is not faster than dense (table %.3f -> %.3f ms, "
                    "measured %.3f -> %.3f ms)", 1e3 * table_dense, 1e3 * table_reference, 1e3 * dense_s, 1e3 * reference_s)
        return 0.0, 1.0
    scale = (dense_s - reference_s) / (table_dense - table_reference)
    offset = dense_s - scale * table_dense
    if offset >= keep * dense_s:
        log.warning("latency model fit skipped: its offset %.3f ms alone is over the budget", 1e3 * offset)
        return 0.0, 1.0
    log.info("latency model fitted to measurement: %.3f ms + %.3f x the table (dense %.3f ms, reference %.3f ms measured)",
             1e3 * offset, scale, 1e3 * dense_s, 1e3 * reference_s)
    return offset, scale
