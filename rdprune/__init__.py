"""rdprune: layer-adaptive weight pruning by rate-distortion optimisation.

The public API is the pruning core, a few calls::

    layers = rdprune.prunable_layers(model)
    curves = rdprune.estimate_curves(model, calibration_inputs, levels=101, worst_case=True)
    amounts = rdprune.allocate(curves, {n: m.weight.numel() for n, m in layers.items()}, 0.5)
    masks = rdprune.apply_masks(model, amounts)

No layer is pruned past its floor (``rdprune.max_amounts(layers, min_density)``: one weight per
output unit on average, and ``min_density`` of its weights): every curve's grid stops there, and
``rdprune.baseline_amounts(method, layers, target, budget="flops", flops=...)`` respects it too.

The command line (``python -m rdprune.run CONFIG``) composes the same calls with data, training and
torchrun.
"""
from rdprune.core.allocation import allocate
from rdprune.core.baselines import BASELINES, baseline_amounts
from rdprune.core.batchnorm import recalibrate_batchnorm
from rdprune.core.curves import estimate_curves, synthetic_inputs
from rdprune.core.floor import max_amounts, max_sparsity, min_kept
from rdprune.core.grid import Curve
from rdprune.core.layers import describe_layers, prunable_layers
from rdprune.core.masks import (
    MaskGuard,
    apply_masks,
    layer_sparsity,
    load_masks,
    pruned_state_dict,
    save_masks,
)

__version__ = "0.1.0"

__all__ = [
    "BASELINES",
    "Curve",
    "MaskGuard",
    "allocate",
    "apply_masks",
    "baseline_amounts",
    "describe_layers",
    "estimate_curves",
    "layer_sparsity",
    "load_masks",
    "max_amounts",
    "max_sparsity",
    "min_kept",
    "prunable_layers",
    "pruned_state_dict",
    "recalibrate_batchnorm",
    "save_masks",
    "synthetic_inputs",
]
