"""BatchNorm recalibration: re-estimate running statistics exactly after pruning.

Pruning shifts the statistics of every BatchNorm layer downstream of a pruned layer; the network
keeps stale running means and variances until fine-tuning repairs them. :func:`recalibrate_batchnorm`
replaces them with the exact per-channel mean and (unbiased, as PyTorch keeps it) variance of each
BatchNorm layer's input over a set of images, with the network as it will run: in eval mode, every
BatchNorm layer upstream already recalibrated. No labels, no gradient, no momentum average.

When the images fit in one batch, one forward pass does it: each layer's statistics are computed
from its input over the whole set just before it normalises with them. Otherwise the layers are
recalibrated one at a time in execution order, each with a pass over the batches that stops right
after it (about half a forward pass per layer on average).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from rdprune.core.layers import evaluation


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """The BatchNorm layers that keep running statistics, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


class _Stop(Exception):
    """Ends a forward pass once the layer being recalibrated has seen its input."""


class _Moments:
    """Per-channel sums of a BatchNorm input over many batches, in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]  # every dim but channels
        x = x.detach().to(torch.float64)
        total, squares = x.sum(dims), (x * x).sum(dims)
        self.count += x.numel() // x.shape[1]
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares

    def store(self, bn: _BatchNorm) -> None:
        """Write the mean and the unbiased variance into ``bn``'s running statistics."""
        if self.count < 2:
            raise ValueError(f"BatchNorm recalibration needs at least 2 values per channel, got {self.count}")
        mean = self.total / self.count
        var = (self.squares - self.count * mean * mean).clamp_min(0) / (self.count - 1)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))


def _execution_order(model: nn.Module, layers: dict[str, _BatchNorm], batch: torch.Tensor) -> list[str]:
    """Names of the BatchNorm layers in the order one forward pass calls them (those never called are left out)."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _x, n=n: order.append(n) if n not in order else None)
               for n, m in layers.items()]
    try:
        model(batch)
    finally:
        for h in handles:
            h.remove()
    return order


def recalibrate_batchnorm(
    model: nn.Module, inputs: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int = 256
) -> list[str]:
    """Reset and re-estimate every BatchNorm layer's running statistics on ``inputs`` (see the module doc).

    ``inputs`` is one tensor of images (split into ``batch_size`` batches) or an iterable of batches,
    on the model's device. Returns the names of the recalibrated layers, in execution order (empty
    for a model without BatchNorm: nothing to do). The model's train/eval modes are restored.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return []
    batches = list(inputs.split(batch_size)) if isinstance(inputs, torch.Tensor) else list(inputs)
    if not batches:
        raise ValueError("BatchNorm recalibration needs at least one batch of images")
    with evaluation(model):
        order = _execution_order(model, layers, batches[0])
        if len(batches) == 1:
            _recalibrate_in_one_pass(model, [layers[n] for n in order], batches[0])
        else:
            for name in order:
                _recalibrate_one(model, layers[name], batches)
    return order


def _recalibrate_in_one_pass(model: nn.Module, layers: list[_BatchNorm], batch: torch.Tensor) -> None:
    def hook(bn: _BatchNorm, args: tuple[torch.Tensor, ...]) -> None:
        moments = _Moments()
        moments.add(args[0])
        moments.store(bn)

    handles = [bn.register_forward_pre_hook(hook) for bn in layers]
    try:
        model(batch)
    finally:
        for h in handles:
            h.remove()


def _recalibrate_one(model: nn.Module, bn: _BatchNorm, batches: list[torch.Tensor]) -> None:
    moments = _Moments()

    def hook(_bn: _BatchNorm, args: tuple[torch.Tensor, ...]) -> None:
        moments.add(args[0])
        raise _Stop

    handle = bn.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            try:
                model(batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    moments.store(bn)


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, every BatchNorm layer normalises with its input's own statistics.

    Each layer's output is computed with the per-channel mean and unbiased variance of the input it
    receives, as if :func:`recalibrate_batchnorm` had just been run on that very input, while the
    running statistics stay untouched (in eval mode, as curve estimation runs). When one forward pass sees the whole image set in one batch,
    its output is exactly that of the network recalibrated on the set: the distortion of a pruned
    network measured this way is the distortion of the network that will be fine-tuned and deployed.
    Yields the names of the layers affected.
    """
    layers = batchnorm_layers(model)

    def renormalise(bn: _BatchNorm, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x, dim=dims, correction=1)
        return nn.functional.batch_norm(x, mean, var, bn.weight, bn.bias, training=False, eps=bn.eps)

    handles = [bn.register_forward_hook(renormalise) for bn in layers.values()]
    try:
        yield list(layers)
    finally:
        for h in handles:
            h.remove()
