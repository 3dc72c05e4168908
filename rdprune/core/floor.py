"""The per-layer floor: the fewest weights a layer keeps, and the largest amount that leaves them.

A layer pruned whole cuts the network (or turns a branch into a constant), so no method may
prune a layer below its floor: RD (the top level of every curve's grid is the floor) and every
baseline alike. The floor of a layer with ``n`` weights and ``units = weight.shape[0]`` output
units (a Conv2d's out_channels, a Linear's out_features) is

    min_kept = min(n, max(units, ceil(min_density * n)))

weights. With the default ``min_density = 0`` this is one weight per output unit on average
(density ``1 / fan_in``): every layer stays alive, and the floor costs little (about 0.1 % of
ResNet-50's weights, so targets up to ~99.9 % stay reachable). A positive ``min_density`` raises
every layer's floor to that fraction of its weights. A layer with one weight per output unit
(fan-in 1) is never pruned.

A layer that is already sparser than its floor (pruned by an earlier run without one) is left as
it is: no method makes a layer denser, and none prunes it further.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from torch import nn


def check_min_density(min_density: float) -> float:
    """``min_density`` as a float, or a ValueError saying what is allowed."""
    if isinstance(min_density, bool) or not isinstance(min_density, (int, float)) or not 0.0 <= min_density < 1.0:
        raise ValueError(f"min_density must be a fraction in [0, 1) (the least share of its weights a layer keeps), got {min_density!r}")
    return float(min_density)


def min_kept(module: nn.Module, min_density: float = 0.0) -> int:
    """The fewest weights ``module`` may keep: one per output unit on average, and ``min_density`` of them."""
    min_density = check_min_density(min_density)
    weight = module.weight
    n = weight.numel()
    # A millionth of a weight of slack so that e.g. 0.01 * 300 does not round up to 4 through float error.
    by_density = math.ceil(min_density * n - 1e-6)
    return min(n, max(int(weight.shape[0]), by_density))


def max_amount(module: nn.Module, min_density: float = 0.0) -> float:
    """The largest absolute amount the floor allows ``module`` (``pruned_count`` of it keeps exactly ``min_kept``)."""
    n = module.weight.numel()
    return (n - min_kept(module, min_density)) / n


def max_amounts(layers: Mapping[str, nn.Module], min_density: float = 0.0) -> dict[str, float]:
    """``{layer name: largest amount its floor allows}`` (see the module notes for the floor).

    The floor alone: a layer already sparser than this keeps its current sparsity (no method
    makes a layer denser), so its effective maximum is ``max(current sparsity, max amount)``.
    """
    return {name: max_amount(module, min_density) for name, module in layers.items()}


def max_sparsity(
    layers: Mapping[str, nn.Module],
    min_density: float = 0.0,
    dense_weights: int = 0,
    *,
    flops: Mapping[str, int] | None = None,
    dense_flops: int = 0,
) -> float:
    """The highest overall sparsity the floors leave reachable (every layer at its floor or sparser now).

    Counted like the weights budget (``dense_weights`` in skipped layers), or, with ``flops``, as
    the fraction of FLOPs removed (``dense_flops`` in skipped layers). A target above it makes RD
    and every baseline raise: check it before the work starts.
    """
    kept = {n: min(int((m.weight != 0).sum()), min_kept(m, min_density)) for n, m in layers.items()}
    if flops is None:
        total = sum(m.weight.numel() for m in layers.values()) + dense_weights
        return 1.0 - (sum(kept.values()) + dense_weights) / total
    total = sum(flops[n] for n in layers) + dense_flops
    return 1.0 - (sum(flops[n] * kept[n] / m.weight.numel() for n, m in layers.items()) + dense_flops) / total
