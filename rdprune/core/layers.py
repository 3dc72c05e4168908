"""Discover the prunable layers of a network, with their weight counts and dense FLOPs."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


@contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; every module's own train/eval flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


@dataclass(frozen=True)
class LayerInfo:
    """A prunable layer: its qualified name, weight count and dense FLOPs per input sample."""

    name: str
    size: int
    flops: int


def prunable_layers(
    model: nn.Module,
    skip: Iterable[str] = (),
    types: Sequence[type[nn.Module]] = PRUNABLE_TYPES,
) -> dict[str, nn.Module]:
    """Return ``{qualified name: module}`` for every prunable layer, in declaration order.

    ``skip`` names layers to leave alone; a name that matches no prunable layer is an error,
    so that a typo cannot silently leave a layer in the pruning set.
    """
    skip = set(skip)
    found = {name: m for name, m in model.named_modules() if isinstance(m, tuple(types))}
    unknown = sorted(skip - set(found))
    if unknown:
        raise ValueError(
            f"layers to skip not found among prunable layers: {unknown}; "
            f"prunable layers are: {sorted(found)[:8]}{' ...' if len(found) > 8 else ''}"
        )
    layers = {name: m for name, m in found.items() if name not in skip}
    if not layers:
        raise ValueError(
            f"model {type(model).__name__} has no prunable layer "
            f"(looked for {', '.join(t.__name__ for t in types)}, skipping {sorted(skip)})"
        )
    return layers


def layer_flops(
    model: nn.Module, layers: dict[str, nn.Module], input_shape: Sequence[int], *, uncalled_ok: bool = False
) -> dict[str, int]:
    """Dense FLOPs per sample of each layer, counted by ``torch.utils.flop_counter``.

    Each layer is measured on the input it really receives in one forward pass of a single
    sample, so declaration order, branches and concatenation do not matter. The dict is in
    execution order (first call of each layer). A layer the forward pass never calls is an error
    (its pruning would mean nothing), or with ``uncalled_ok`` (layers left dense) costs 0 FLOPs.
    """
    counts: dict[str, int] = {}

    def hook(name: str):
        def _hook(module: nn.Module, args: tuple) -> None:
            with FlopCounterMode(display=False) as counter:
                type(module).forward(module, *args)
            counts[name] = counts.get(name, 0) + int(counter.get_total_flops())

        return _hook

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in layers if n not in counts]
    if uncalled_ok:
        return {**counts, **dict.fromkeys(missing, 0)}
    if missing:
        raise ValueError(f"layers never called in a forward pass: {missing[:5]}; skip them")
    return counts


def describe_layers(
    model: nn.Module,
    input_shape: Sequence[int],
    skip: Iterable[str] = (),
) -> list[LayerInfo]:
    """Prunable layers with weight counts and FLOPs, in execution order."""
    layers = prunable_layers(model, skip)
    flops = layer_flops(model, layers, input_shape)
    return [LayerInfo(n, layers[n].weight.numel(), f) for n, f in flops.items()]
