"""Magnitude masks: build them from per-layer amounts, keep pruned weights at zero, save, fold."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from torch import nn

from rdprune.files import atomic_torch_save

Masks = dict[str, torch.Tensor]
"""``{layer name: bool tensor shaped like the weight, True where the weight survives}``."""


def pruned_count(amount: float, size: int) -> int:
    """Number of weights that amount ``amount`` of a layer of ``size`` weights prunes: round(a*n)."""
    check_amount(amount)
    return int(math.floor(amount * size + 0.5))


def check_amount(amount: float, name: str = "amount") -> None:
    """Raise ``ValueError`` unless ``amount`` is a finite fraction in [0, 1]."""
    if not (isinstance(amount, (int, float)) and math.isfinite(amount) and 0.0 <= amount <= 1.0):
        raise ValueError(f"{name} must be a fraction in [0, 1], got {amount!r}")


def magnitude_order(weight: torch.Tensor) -> torch.Tensor:
    """Flat indices of ``weight`` from smallest to largest magnitude (stable, so zeros come first)."""
    return torch.argsort(weight.detach().abs().flatten(), stable=True)


def magnitude_mask(weight: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """Keep-mask that zeroes the ``n_pruned`` smallest-magnitude weights of ``weight``."""
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    keep[magnitude_order(weight)[:n_pruned]] = False
    return keep.view_as(weight)


def current_masks(layers: Mapping[str, nn.Module]) -> Masks:
    """Masks of the weights that are non-zero now."""
    return {name: m.weight.detach() != 0 for name, m in layers.items()}


def masks_for_amounts(layers: Mapping[str, nn.Module], amounts: Mapping[str, float]) -> Masks:
    """Magnitude masks pruning ``amounts[name]`` (absolute fraction) of each named layer.

    Layers absent from ``amounts`` keep their current zeros. A mask never revives a zero weight.
    """
    unknown = sorted(set(amounts) - set(layers))
    if unknown:
        raise ValueError(f"amounts given for unknown layers {unknown[:5]}; known: {sorted(layers)[:5]} ...")
    masks = current_masks(layers)
    for name, amount in amounts.items():
        check_amount(amount, f"amount of layer {name!r}")
        weight = layers[name].weight
        masks[name] = magnitude_mask(weight, pruned_count(amount, weight.numel())) & masks[name]
    return masks


@torch.no_grad()
def enforce_masks(layers: Mapping[str, nn.Module], masks: Masks) -> None:
    """Zero every masked weight in place."""
    for name, mask in masks.items():
        layers[name].weight.mul_(mask.to(layers[name].weight.dtype))


def apply_masks(model: nn.Module, amounts: Mapping[str, float], layers: Mapping[str, nn.Module] | None = None) -> Masks:
    """Prune ``model`` in place to the given absolute per-layer amounts by magnitude; return the masks."""
    from rdprune.core.layers import prunable_layers

    layers = dict(layers) if layers is not None else prunable_layers(model)
    masks = masks_for_amounts(layers, amounts)
    enforce_masks(layers, masks)
    return masks


class MaskGuard:
    """Keeps pruned weights exactly zero while a model trains.

    Gradients of pruned weights are zeroed by a hook (so momentum and adaptive state never move
    them) and the masks are re-applied after every optimiser step (so weight decay, or an
    optimiser that updates with zero gradient, cannot either). Use as a context manager or call
    :meth:`remove`.
    """

    def __init__(self, layers: Mapping[str, nn.Module], masks: Masks, optimizer: torch.optim.Optimizer | None = None):
        self.layers = dict(layers)
        self.masks = {n: m.to(self.layers[n].weight.device) for n, m in masks.items()}
        enforce_masks(self.layers, self.masks)
        self._handles = [
            self.layers[n].weight.register_hook(lambda g, m=m: g * m.to(g.dtype)) for n, m in self.masks.items()
        ]
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: enforce_masks(self.layers, self.masks)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> MaskGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def layer_sparsity(layers: Mapping[str, nn.Module]) -> dict[str, float]:
    """Fraction of zero weights of each layer."""
    return {n: float((m.weight == 0).sum()) / m.weight.numel() for n, m in layers.items()}


def total_sparsity(sizes: Mapping[str, int], sparsity: Mapping[str, float], dense: int = 0) -> float:
    """Overall zero fraction; ``dense`` counts weights of skipped layers, kept dense."""
    total = sum(sizes.values()) + dense
    return sum(sizes[n] * sparsity.get(n, 0.0) for n in sizes) / total


def flops_remaining(flops: Mapping[str, int], sparsity: Mapping[str, float], dense: int = 0) -> float:
    """Fraction of the prunable layers' dense FLOPs that remain (a layer's FLOPs scale with its density)."""
    total = sum(flops.values()) + dense
    return (sum(f * (1.0 - sparsity.get(n, 0.0)) for n, f in flops.items()) + dense) / total


def save_masks(masks: Masks, path: str | os.PathLike) -> None:
    """Save masks alone (bool tensors on CPU), atomically."""
    atomic_torch_save({n: m.detach().cpu() for n, m in masks.items()}, path)


def load_masks(path: str | os.PathLike) -> Masks:
    """Load masks saved by :func:`save_masks` (``weights_only=True``)."""
    masks = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(masks, dict) or not all(isinstance(m, torch.Tensor) and m.dtype == torch.bool for m in masks.values()):
        raise ValueError(f"{path} does not hold masks (a dict of bool tensors)")
    return masks


def pruned_state_dict(model: nn.Module, masks: Masks) -> dict[str, torch.Tensor]:
    """A plain state_dict on the CPU with masked weights zeroed, loadable into the unmodified architecture.

    On the CPU whatever device the model is on, so that a model pruned on a GPU loads anywhere.
    """
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    for name, mask in masks.items():
        key = f"{name}.weight"
        state[key] = state[key] * mask.to(state[key].device, state[key].dtype)
    return state
