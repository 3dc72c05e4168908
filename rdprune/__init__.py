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
    cost = rdprune.ChannelCost(space, "latency", latency=rdprune.LatencyTable.build(model, batch, rdprune.layer_shapes(model, batch)))
    removal = rdprune.allocate_channels(curves, plans, cost, 0.5 * cost.dense).removal
    smaller = rdprune.remove_channels(model, example_input, space.removed_indices(removal))

2:4 granularity chooses which Linear layers become 2:4 sparse (the pattern GPUs run faster)::

    layers, left_out = rdprune.two_four_candidates(model)
    curves = rdprune.estimate_semi_structured_curves(model, layers, calibration_inputs)
    cost = rdprune.two_four_weight_cost(layers, sum(m.weight.numel() for m in rdprune.prunable_layers(model).values()))
    chosen = rdprune.allocate_two_four(curves, cost, 0.25).layers
    masks = rdprune.apply_two_four(layers, chosen)
    fast = rdprune.to_semi_structured(model, chosen)  # bf16 on a CUDA GPU of compute capability 8.0+

Models by name, from local files and caches only: ``rdprune.build_model("timm:deit_small_patch16_224",
1000, weights="DEFAULT")``, ``rdprune.build_model("hf:path/to/folder", 10, weights="DEFAULT")``.

The final model of a finished run, in eval mode: ``rdprune.load_model("runs/quickstart")`` (the masked
full model, any granularity), ``rdprune.load_model("runs/quickstart_channels", smaller=True)`` (the
physically smaller model a channel run exports).

The command line (``python -m rdprune.run CONFIG``) composes the same calls with data, training and
torchrun.
"""
from rdprune.core.allocation import allocate
from rdprune.core.baselines import BASELINES, baseline_amounts
from rdprune.core.batchnorm import recalibrate_batchnorm
from rdprune.core.channel_allocation import allocate_channels, meet_measured_latency
from rdprune.core.channel_baselines import channel_baseline
from rdprune.core.channel_costs import ChannelCost
from rdprune.core.channel_curves import estimate_channel_curves, group_plan
from rdprune.core.channels import ChannelSpace
from rdprune.core.curves import estimate_curves, synthetic_inputs
from rdprune.core.export import remove_channels, save_exported
from rdprune.core.floor import max_amounts, max_sparsity, min_kept
from rdprune.core.grid import Curve
from rdprune.core.latency import LatencyTable, layer_shapes, measure_latency
from rdprune.core.layers import describe_layers, prunable_layers
from rdprune.core.masks import (
    MaskGuard,
    apply_masks,
    layer_sparsity,
    load_masks,
    pruned_state_dict,
    save_masks,
)
from rdprune.core.semi_structured import allocate_two_four, apply_two_four, estimate_semi_structured_curves
from rdprune.core.semi_structured import candidates as two_four_candidates
from rdprune.core.semi_structured import weight_cost as two_four_weight_cost
from rdprune.core.semi_structured_latency import to_semi_structured

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``rdprune.build_model`` and ``rdprune.load_model``, imported on first use: the model registry
    brings torchvision (and ``load_model`` the data registry), which the pruning core does not need."""
    if name == "build_model":
        from rdprune.models.registry import build_model

        return build_model
    if name == "load_model":
        from rdprune.pipeline.load import load_model

        return load_model
    raise AttributeError(f"module 'rdprune' has no attribute {name!r}")


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
    "describe_layers",
    "estimate_channel_curves",
    "estimate_curves",
    "estimate_semi_structured_curves",
    "group_plan",
    "layer_shapes",
    "layer_sparsity",
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
    "to_semi_structured",
    "two_four_candidates",
    "two_four_weight_cost",
]
