"""Rate-distortion curves estimated by all ranks together: each rank its share of (layer, levels) pieces.

Rank 0 plans the shards from the core's cost estimate (the FLOPs one level of a layer re-runs,
times the levels that need a forward pass) and broadcasts the plan; every rank estimates its
pieces with the single-process core; the pieces are gathered to rank 0 and joined. Each finished
piece is cached in ``cache_dir`` (shared by the run directory), so a job restarted with the same
world size recomputes only the pieces that were in flight.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from rdprune import distributed
from rdprune.core.curves import UnitPlan, curve_costs, estimate_curves, layer_amounts, merge_curve_pieces
from rdprune.core.distortion import Distortion
from rdprune.core.grid import Curve, Grid
from rdprune.core.layers import prunable_layers
from rdprune.core.masks import pruned_count
from rdprune.distributed import DistInfo
from rdprune.distributed.sharding import Piece, plan_shards

log = logging.getLogger(__name__)


def _free_prefix(module: nn.Module, levels: int, grid: Grid, min_density: float) -> tuple[int, int]:
    """(levels that prune nothing new, all levels) of a layer: the first cost no forward pass."""
    counts = [pruned_count(float(a), module.weight.numel()) for a in layer_amounts(module, levels, grid, min_density)]
    zeros = int((module.weight == 0).sum())
    return sum(1 for c in counts if c <= zeros), len(counts)


def curve_work(
    model: nn.Module, sample_shape: tuple[int, ...], levels: int, grid: Grid, skip: Iterable[str], min_density: float = 0.0
) -> tuple[dict[str, tuple[float, int]], dict[str, tuple[int, int]]]:
    """(cost per paid level and number of paid levels, for layers with any; (free, all) levels of every layer).

    A paid level prunes something new and needs a forward pass of the layer's suffix; the free
    leading levels of an already sparse layer need none.
    """
    layers = prunable_layers(model, skip)
    costs = curve_costs(model, sample_shape, levels, grid, skip=skip, min_density=min_density)
    spans = {n: _free_prefix(m, levels, grid, min_density) for n, m in layers.items()}
    paid = {}
    for name, (flops, to_run) in costs.items():
        free, total = spans[name]
        if total > free:
            # Distinct amounts can prune the same count in a small layer: spread the real runs evenly.
            paid[name] = (flops * to_run / (total - free), total - free)
    return paid, spans


def plan_curve_shards(
    model: nn.Module, sample_shape: tuple[int, ...], levels: int, grid: Grid, skip: Iterable[str], world_size: int,
    min_density: float = 0.0,
) -> list[list[Piece]]:
    """Pieces per rank, in indices of :func:`layer_amounts`, balanced by the forward work they need.

    Only paid levels are shared out by cost; a layer's free leading levels ride along with the
    piece that starts its paid ones, and a layer with no paid level at all goes whole to rank 0.
    """
    paid, spans = curve_work(model, sample_shape, levels, grid, skip, min_density)
    return level_pieces(paid, spans, world_size)


def level_pieces(paid: Mapping[str, tuple[float, int]], spans: Mapping[str, tuple[int, int]], world_size: int) -> list[list[Piece]]:
    """Shard the paid levels of every unit by cost; map them back to whole-grid indices.

    ``spans[unit]`` is (free leading levels, all levels). A unit's free levels ride along with the
    piece that starts its paid ones; a unit with no paid level goes whole to rank 0.
    """
    plan = [
        [Piece(p.unit, 0 if p.start == 0 else p.start + spans[p.unit][0], p.stop + spans[p.unit][0]) for p in shard]
        for shard in plan_shards(paid, world_size)
    ]
    plan[0].extend(Piece(n, 0, total) for n, (free, total) in spans.items() if n not in paid)
    return plan


def suffix_pieces(plans: Mapping[str, UnitPlan], first: Mapping[str, str], flops: Mapping[str, int],
                  world_size: int) -> list[list[Piece]]:
    """:func:`level_pieces` for units whose levels each re-run the network from their first layer on.

    ``plans`` are the units' level plans (levels up to ``zeros`` are free); ``first[unit]`` names the
    unit's first layer in ``flops``, which lists every layer's FLOPs in execution order, so a paid
    level costs the FLOPs from that layer to the output.
    """
    order = list(flops)
    paid, spans = {}, {}
    for unit, plan in plans.items():
        spans[unit] = (sum(1 for c in plan.counts if c <= plan.zeros), len(plan.counts))
        if spans[unit][1] > spans[unit][0]:
            paid[unit] = (float(sum(flops[n] for n in order[order.index(first[unit]):])), spans[unit][1] - spans[unit][0])
    return level_pieces(paid, spans, world_size)


def sharded_curves(
    model: nn.Module,
    inputs: torch.Tensor | list[torch.Tensor],
    levels: int,
    *,
    grid: Grid,
    distortion: Distortion,
    skip: Iterable[str],
    batch_size: int,
    cache_dir: str | os.PathLike | None,
    dist: DistInfo,
    progress: bool,
    min_density: float = 0.0,
    bn_aware: bool = False,
) -> dict[str, Curve] | None:
    """Every prunable layer's curve on rank 0 (``None`` on the other ranks); equal to :func:`estimate_curves`.

    Every rank must call it with the same model weights and calibration inputs (checked) and a
    fixed thread count, so that its pieces are exactly what one process would compute.
    """
    skip = list(skip)
    batches = list(inputs.split(batch_size)) if isinstance(inputs, torch.Tensor) else list(inputs)

    def plan() -> list[list[Piece]]:
        return plan_curve_shards(model, tuple(batches[0].shape[1:]), levels, grid, skip, dist.world_size, min_density)

    def estimate(mine: list[Piece]) -> dict[str, Curve]:
        return estimate_curves(
            model, batches, levels, grid=grid, worst_case=distortion.worst_case, measure=distortion.measure,
            layers=[p.unit for p in mine], skip=skip,
            level_ranges={p.unit: (p.start, p.stop) for p in mine}, batch_size=batch_size,
            cache_dir=cache_dir, progress=progress, min_density=min_density, bn_aware=bn_aware,
        )

    return sharded_unit_curves(model, batches, dist, plan, estimate, list(prunable_layers(model, skip)), "curve estimation")


def sharded_unit_curves(
    model: nn.Module, batches: list[torch.Tensor], dist: DistInfo, plan: Callable[[], list[list[Piece]]],
    estimate: Callable[[list[Piece]], dict[str, Curve]], order: list[str], what: str,
) -> dict[str, Curve] | None:
    """Every unit's curve on rank 0 (``None`` elsewhere), whatever a unit is: the rank protocol of every granularity.

    Checks that every rank has the same weights and inputs, runs ``plan()`` on rank 0 (pieces of
    (unit, level range) per rank, e.g. from :func:`suffix_pieces`) and broadcasts it, runs
    ``estimate(this rank's pieces)`` with the single-process engine, gathers the pieces on rank 0 and
    joins them into one curve per unit of ``order``. ``what`` names the work in the log.
    """
    distributed.check_identical([b.detach().cpu() for b in batches], "the calibration inputs")
    distributed.check_identical(model.state_dict(), "the model weights before curve estimation")
    pieces = distributed.broadcast_object(plan() if dist.is_main else None, src=0)
    mine = pieces[dist.rank]
    log.info("%s: %d pieces over %d ranks", what, sum(map(len, pieces)), dist.world_size)
    gathered = distributed.gather_objects(estimate(mine) if mine else {}, dst=0)
    return None if gathered is None else _join(gathered, order)


def _join(per_rank: list[Mapping[str, Curve]], order: list[str]) -> dict[str, Curve]:
    """One curve per unit from the pieces of all ranks, in the model's layer order."""
    pieces: dict[str, list[Curve]] = {}
    for part in per_rank:
        for name, curve in part.items():
            pieces.setdefault(name, []).append(curve)
    missing = [n for n in order if n not in pieces]
    if missing:
        raise RuntimeError(f"no rank returned a curve for layers {missing[:5]}")
    return {n: merge_curve_pieces(pieces[n]) for n in order}
