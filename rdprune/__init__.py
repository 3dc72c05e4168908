"""rdprune: layer-adaptive weight pruning by rate-distortion optimisation.

The public API is the pruning core, a few calls::

    layers = rdprune.prunable_layers(model)
    curves = rdprune.estimate_curves(model, calibration_inputs, levels=101, worst_case=True)
    amounts = rdprune.allocate(curves, {n: m.weight.numel() for n, m in layers.items()}, 0.5)
    masks = rdprune.apply_masks(model, amounts)

No layer is pruned past its floor (``rdprune.max_amounts(layers, min_density)``: one weight per
output unit on average, and ``min_density`` of its weights): every curve's grid stops there, and
``rdprune.baseline_amounts(method, layers, target, budget="flops", flops=...)`` respects it too.

Channel granularity (``pip install 'rdprune[channels]'``) uses the same allocator on groups of
coupled channels, with weights, FLOPs or a measured latency as the budget::

    space = rdprune.ChannelSpace(model, example_input)
    curves = rdprune.estimate_channel_curves(model, space, calibration_inputs, levels=11)
    plans = {g: rdprune.group_plan(space, g, 11, "relative") for g in space.groups}
    widths = rdprune.level_widths(space, plans)  # time each layer at exactly the channel counts the levels give
    table = rdprune.LatencyTable.build(model, batch, rdprune.layer_shapes(model, batch), channel_grid=widths)
    cost = rdprune.ChannelCost(space, "latency", latency=table)
    removal = rdprune.allocate_channels(curves, plans, cost, 0.5 * cost.total).choice
    smaller = rdprune.remove_channels(model, example_input, space.removed_indices(removal))

2:4 granularity chooses which Linear layers become 2:4 sparse (the pattern GPUs run faster)::

    layers, left_out = rdprune.two_four_candidates(model)
    curves = rdprune.estimate_two_four_curves(model, layers, calibration_inputs)
    cost = rdprune.two_four_weight_cost(layers, sum(m.weight.numel() for m in rdprune.prunable_layers(model).values()))
    chosen = rdprune.allocate_two_four(curves, cost, 0.25).choice
    masks = rdprune.apply_two_four(layers, chosen)
    fast = rdprune.to_two_four(model, chosen)  # bf16 on a CUDA GPU of compute capability 8.0+

Models by name, from local files and caches only: ``rdprune.build_model("timm:deit_small_patch16_224",
1000, weights="DEFAULT")``, ``rdprune.build_model("hf:path/to/folder", 10, weights="DEFAULT")``.

The final model of a finished run, in eval mode: ``rdprune.load_model("runs/quickstart")`` (the masked
full model, any granularity), ``rdprune.load_model("runs/quickstart_channels", smaller=True)`` (the
physically smaller model a channel run exports).

The command line (``python -m rdprune.run CONFIG``) composes the same calls with data, training and
torchrun.
"""
from __future__ import annotations

import warnings

from rdprune.lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "allocate": "rdprune.core.allocation:allocate",
    "recalibrate_batchnorm": "rdprune.core.batchnorm:recalibrate_batchnorm",
    "estimate_curves": "rdprune.core.curves:estimate_curves",
    "synthetic_inputs": "rdprune.core.curves:synthetic_inputs",
    "max_amounts": "rdprune.core.floor:max_amounts",
    "max_sparsity": "rdprune.core.floor:max_sparsity",
    "min_kept": "rdprune.core.floor:min_kept",
    "Curve": "rdprune.core.grid:Curve",
    "describe_layers": "rdprune.core.layers:describe_layers",
    "prunable_layers": "rdprune.core.layers:prunable_layers",
    "layer_shapes": "rdprune.core.timing:layer_shapes",
    "measure_latency": "rdprune.core.timing:measure_latency",
    "allocate_channels": "rdprune.granularity.channel.allocation:allocate_channels",
    "meet_measured_latency": "rdprune.granularity.channel.allocation:meet_measured_latency",
    "channel_baseline": "rdprune.granularity.channel.baselines:channel_baseline",
    "ChannelCost": "rdprune.granularity.channel.costs:ChannelCost",
    "channel_cost": "rdprune.granularity.channel.costs:channel_cost",
    "estimate_channel_curves": "rdprune.granularity.channel.curves:estimate_channel_curves",
    "group_plan": "rdprune.granularity.channel.curves:group_plan",
    "remove_channels": "rdprune.granularity.channel.export:remove_channels",
    "save_exported": "rdprune.granularity.channel.export:save_exported",
    "LatencyTable": "rdprune.granularity.channel.latency:LatencyTable",
    "level_widths": "rdprune.granularity.channel.latency:level_widths",
    "ChannelSpace": "rdprune.granularity.channel.space:ChannelSpace",
    "to_two_four": "rdprune.granularity.two_four.kernels:to_two_four",
    "allocate_two_four": "rdprune.granularity.two_four.units:allocate_two_four",
    "apply_two_four": "rdprune.granularity.two_four.units:apply_two_four",
    "estimate_two_four_curves": "rdprune.granularity.two_four.units:estimate_two_four_curves",
    "two_four_candidates": "rdprune.granularity.two_four.units:candidates",
    "two_four_weight_cost": "rdprune.granularity.two_four.units:weight_cost",
    "BASELINES": "rdprune.granularity.weight.baselines:BASELINES",
    "baseline_amounts": "rdprune.granularity.weight.baselines:baseline_amounts",
    "MaskGuard": "rdprune.core.masks:MaskGuard",
    "apply_masks": "rdprune.core.masks:apply_masks",
    "layer_sparsity": "rdprune.core.masks:layer_sparsity",
    "load_masks": "rdprune.core.masks:load_masks",
    "pruned_state_dict": "rdprune.core.masks:pruned_state_dict",
    "save_masks": "rdprune.core.masks:save_masks",
    "build_model": "rdprune.models.registry:build_model",
    "load_model": "rdprune.pipeline.load:load_model",
}
"""Public names -> "module:attribute", imported on first use: ``import rdprune`` (and loading a config)
imports no torch, so that a bad config is refused at once."""
_DEPRECATED = {
    "estimate_semi_structured_curves": "estimate_two_four_curves",
    "to_semi_structured": "to_two_four",
}
"""Old public names -> their new names; they keep working, with a DeprecationWarning, for one release."""


_exports = lazy_exports(__name__, _LAZY)


def __getattr__(name: str) -> object:
    if name in _DEPRECATED:
        warnings.warn(f"rdprune.{name} is deprecated; use rdprune.{_DEPRECATED[name]}", DeprecationWarning, stacklevel=2)
        return __getattr__(_DEPRECATED[name])
    return _exports(name)


__all__ = [
    "BASELINES",
    "ChannelCost",
    "ChannelSpace",
    "Curve",
    "LatencyTable",
    "MaskGuard",
    "allocate",
    "allocate_channels",
    "allocate_two_four",
    "apply_masks",
    "apply_two_four",
    "baseline_amounts",
    "build_model",
    "channel_baseline",
    "channel_cost",
    "describe_layers",
    "estimate_channel_curves",
    "estimate_curves",
    "estimate_two_four_curves",
    "group_plan",
    "layer_shapes",
    "layer_sparsity",
    "level_widths",
    "load_masks",
    "load_model",
    "max_amounts",
    "max_sparsity",
    "measure_latency",
    "meet_measured_latency",
    "min_kept",
    "prunable_layers",
    "pruned_state_dict",
    "recalibrate_batchnorm",
    "remove_channels",
    "save_exported",
    "save_masks",
    "synthetic_inputs",
    "to_two_four",
    "two_four_candidates",
    "two_four_weight_cost",
]
