"""Rate-distortion curves of channel groups: the output distortion when one group alone loses channels.

For group g and level n, the n least important channels of g are masked in every layer of the
group (:class:`rdprune.granularity.channel.space.ChannelSpace`), the network runs in eval mode on the
calibration inputs and its output is compared with the unpruned output (``mse`` or ``kl``, or
either at its worst sample: :mod:`rdprune.core.distortion`, as for weights). A curve's amounts
are fractions of the group's channels.

:func:`estimate_channel_curves` re-runs only what depends on the group's layers (the suffix from
its first layer, :mod:`rdprune.core.suffix`) and skips levels that remove nothing new, through
the same engine as weight curves (:func:`rdprune.core.curves.unit_curves`);
:func:`plain_channel_curves` is the definition run literally, which it is tested against.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from rdprune.core.batchnorm import batch_statistics, batchnorm_layers
from rdprune.core.curves import UnitPlan, as_batches, curve_cache, plain_unit_curves, select_units, unit_curves
from rdprune.core.distortion import Distortion, Measure
from rdprune.core.grid import Curve, Grid, level_amounts
from rdprune.granularity.channel.space import ChannelSpace


class ChannelUnit:
    """One channel group as a pruning unit: level ``count`` masks its ``count`` least important channels."""

    kind = "channel group"

    def __init__(self, space: ChannelSpace, group: str):
        self.name, self._space = group, space
        layers = dict.fromkeys(s.layer for s in space.groups[group].slices)
        self.modules = tuple(space.layers[n] for n in layers)
        self._names = list(layers)

    def hold(self) -> None:
        self._original = {n: self._space.layers[n].weight.detach().clone() for n in self._names}
        self._order = self._space.removal_order(self.name)

    def prune(self, count: int) -> None:
        for layer, mask in self._space.group_masks(self.name, count, self._order).items():
            self._space.layers[layer].weight.copy_(self._original[layer] * mask)

    def restore(self) -> None:
        for n, w in self._original.items():
            self._space.layers[n].weight.copy_(w)
        del self._original, self._order


def group_plan(space: ChannelSpace, group: str, levels: int, grid: Grid, level_range: tuple[int, int] | None = None,
               round_to: int = 1) -> UnitPlan:
    """The levels of one group: distinct removed-channel counts from the grid, up to the group's floor.

    The grid is the weight grid on the fraction of channels removed (``relative``: from what is
    removed now to the floor; ``absolute``: the published levels below the floor, then the floor),
    rounded to whole channels; amounts are exactly ``count / size``. With ``round_to`` N > 1 each
    level's kept count is rounded to a multiple of N (within what is kept now and the floor raised
    to a multiple of N), and what is removed now stays the first level.
    """
    size = space.groups[group].size
    removed = space.removed(group)
    top = space.max_removed(group) / size
    raw = level_amounts(levels, grid, removed / size, top)
    counts = np.unique(np.clip(np.floor(raw * size + 0.5).astype(np.int64), removed, max(removed, space.max_removed(group))))
    if round_to > 1:
        least = round_to * -(-(size - space.max_removed(group)) // round_to)  # the floor, up to a multiple
        most = round_to * ((size - removed) // round_to)  # what is kept now, down to a multiple
        kept = np.clip(round_to * np.floor((size - counts) / round_to + 0.5).astype(np.int64), least, most)
        counts = np.unique(np.concatenate([[removed], size - kept[kept >= least] if least <= most else []]).astype(np.int64))
    if level_range is not None:
        start, stop = level_range
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= len(counts)):
            raise ValueError(f"level range of group {group!r} must satisfy 0 <= start < stop <= {len(counts)}, got {level_range}")
        counts = counts[start:stop]
    return UnitPlan(counts / size, [int(c) for c in counts], removed, level_range)


def estimate_channel_curves(
    model: nn.Module,
    space: ChannelSpace,
    inputs: torch.Tensor | Iterable[torch.Tensor],
    levels: int = 101,
    *,
    grid: Grid = "relative",
    worst_case: bool = False,
    measure: Measure = "mse",
    groups: Iterable[str] | None = None,
    level_ranges: Mapping[str, tuple[int, int]] | None = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    bn_aware: bool = False,
    round_to: int = 1,
) -> dict[str, Curve]:
    """Curve of each channel group of ``space`` (``groups``: a subset, e.g. one rank's shard), in group order.

    ``level_ranges`` index :func:`group_plan`'s counts (with ``round_to``), as for weight curves; with ``cache_dir``
    each finished group is saved and reused by a later call with identical model, inputs and
    settings. ``bn_aware`` measures the network that will run: every BatchNorm layer normalises
    with the statistics of its new input on the calibration inputs (the unpruned reference too), as
    :func:`plain_channel_curves` with ``bn_aware`` does by re-estimating them; the inputs must form
    one batch. The model is left exactly as it was.
    """
    chosen = select_units(space.groups, groups, "channel groups")
    batches = as_batches(inputs, batch_size)
    ranges = dict(level_ranges or {})
    plans = {g: (ChannelUnit(space, g), group_plan(space, g, levels, grid, ranges.get(g), round_to)) for g in chosen}
    floors = ",".join(f"{g.min_kept}" for g in space.groups.values())
    bn_aware = bn_aware and bool(batchnorm_layers(model))
    if bn_aware and len(batches) > 1:
        raise ValueError(f"BatchNorm-aware channel curves need the calibration inputs in one batch: {sum(map(len, batches))} "
                         f"inputs came in {len(batches)} batches; raise the batch size to at least their number")
    distortion = Distortion(measure, worst_case)
    settings = f"granularity=channel:levels={levels}:grid={grid}:{distortion.cache_key}:floors={floors}"
    # Added to the key only when set, so that caches of earlier versions (stale statistics, l2, no rounding) stay valid.
    settings += f":bn_aware=True:ranking={space.ranking}" if bn_aware else ("" if space.ranking == "l2" else f":ranking={space.ranking}")
    settings += f":round_to={round_to}" if round_to > 1 else ""
    cache = curve_cache(cache_dir, model, batches, settings)
    with batch_statistics(model) if bn_aware else contextlib.nullcontext():
        return unit_curves(model, space.layers.values(), plans, batches, distortion, cache, progress)


def plain_channel_curves(
    model: nn.Module, space: ChannelSpace, inputs: torch.Tensor | Iterable[torch.Tensor], levels: int = 101, *,
    grid: Grid = "relative", worst_case: bool = False, measure: Measure = "mse", batch_size: int = 64, bn_aware: bool = False,
) -> dict[str, Curve]:
    """The definition run literally: for every group and level, mask, (with ``bn_aware``: re-estimate every BatchNorm
    layer's statistics on the inputs with :func:`rdprune.core.batchnorm.recalibrate_batchnorm``), run the whole model,
    compare."""
    units = {g: (ChannelUnit(space, g), group_plan(space, g, levels, grid)) for g in space.groups}
    return plain_unit_curves(model, units, as_batches(inputs, batch_size), Distortion(measure, worst_case), recalibrate=bn_aware)
