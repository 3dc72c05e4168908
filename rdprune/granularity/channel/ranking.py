"""Which channels of a group go first: the rankings of ``prune.ranking`` at channel granularity.

A ranking scores every channel of every group (higher = more important); the curves, RD's choice
and the ``unif`` / ``glob`` baselines then all remove a group's lowest-scored channels first
(:meth:`ChannelSpace.rank`). Coupled groups sum the scores of every layer of the group. Removed
channels always stay first, whatever their score.

- ``l2``: the L2 norm of each channel's weights over the group (producers' output slices and
  consumers' input slices); needs no data.
- ``taylor``: first-order Taylor, ``|sum over samples and positions of activation x gradient|`` of
  the classification loss on the calibration images and their labels, at the output of every
  convolution and linear layer that produces the group's channels (Molchanov et al.'s criterion).
  It needs labelled data: zero-data pruning (``calibration.source synthetic``) refuses it.
- ``bn_scale``: ``|gamma|`` of the group's BatchNorm layers (Network Slimming's criterion); a group
  without BatchNorm falls back to ``l2``.
- ``activation``: what removing the channel changes where the network reads it: the variance of the
  channel at the input of each layer that consumes it (over the calibration images and positions)
  times the squared norm of that layer's weights on it, summed over the consumers: the expected
  squared change of the consumers' outputs, to first order. The variance, not the mean square,
  because the BatchNorm recalibrated after pruning re-centres what a removed channel's constant
  part shifted. Needs calibration inputs but no labels (zero-data pruning can use it); a group
  that no layer reads as its input falls back to ``l2``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from rdprune.core.layers import evaluation
from rdprune.granularity.channel.space import ChannelSpace

Scores = dict[str, torch.Tensor]


def l2_scores(space: ChannelSpace) -> None:
    """``l2`` follows the weights as they change: no fixed scores."""
    return None


def bn_scale_scores(space: ChannelSpace) -> Scores:
    """|gamma| summed over the group's BatchNorm layers; the L2 norm for a group with none (or no affine scale)."""
    scores = {}
    modules = dict(space.model.named_modules())
    for name, group in space.groups.items():
        norms = [s for s in group.norms if getattr(modules[s.layer], "weight", None) is not None]
        if not norms:
            scores[name] = space.weight_norms(name)
            continue
        total = torch.zeros(group.size, dtype=torch.float64)
        for s in norms:
            gamma = modules[s.layer].weight.detach().double().abs().cpu()
            total += gamma[s.index].sum(dim=1)
        scores[name] = total
    return scores


def taylor_scores(space: ChannelSpace, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Scores:
    """|activation x gradient| of the cross-entropy loss at each producer's output, per group channel.

    Summed over the samples and spatial positions of each batch (the loss is the batch mean), then
    the absolute value, summed over the batches and over the group's producing layers. The model's
    weights, buffers, modes and gradients are left as they were.
    """
    model = space.model
    device = next(model.parameters()).device
    per_layer: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str, _module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        outputs[name] = output

    producers = {s.layer for g in space.groups.values() for s in g.slices if s.dim == 0}
    handles = [space.layers[n].register_forward_hook(functools.partial(keep, n)) for n in producers]
    grads = {n: p.grad for n, p in model.named_parameters()}
    try:
        with evaluation(model), torch.enable_grad():
            for x, y in zip(inputs.split(batch_size), labels.split(batch_size)):
                outputs.clear()
                loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
                loss.backward()
                for n, out in outputs.items():
                    dims = [d for d in range(out.dim()) if d != 1]
                    contribution = (out.detach() * out.grad).sum(dim=dims).abs().double().cpu()
                    per_layer[n] = per_layer.get(n, 0) + contribution
                model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.grad = grads[n]
    scores = {}
    for name, group in space.groups.items():
        total = torch.zeros(group.size, dtype=torch.float64)
        for s in group.slices:
            if s.dim == 0 and s.layer in per_layer:
                total += per_layer[s.layer][s.index].sum(dim=1)
        scores[name] = total
    return scores


def activation_scores(space: ChannelSpace, inputs: torch.Tensor, batch_size: int) -> Scores:
    """Per group channel: sum over its consumers of Var[input channel] x ||consumer weights on it||^2.

    The variance is over every sample and position of the calibration inputs (accumulated batch by
    batch in float64); a consumer is a layer whose input channels are the group's (weight dimension 1).
    """
    model = space.model
    device = next(model.parameters()).device
    consumers = {s.layer for g in space.groups.values() for s in g.slices if s.dim == 1}
    moments: dict[str, list[torch.Tensor]] = {}  # count, sum, sum of squares per input channel

    def keep(name: str, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().double()
        dim = -1 if isinstance(module, nn.Linear) else 1  # where the layer reads its input channels
        x = x.movedim(dim, 0).reshape(x.shape[dim], -1)
        seen = moments.setdefault(name, [torch.zeros((), dtype=torch.float64, device=x.device),
                                         torch.zeros(len(x), dtype=torch.float64, device=x.device),
                                         torch.zeros(len(x), dtype=torch.float64, device=x.device)])
        seen[0] += x.shape[1]
        seen[1] += x.sum(dim=1)
        seen[2] += x.pow(2).sum(dim=1)

    handles = [space.layers[n].register_forward_pre_hook(functools.partial(keep, n)) for n in consumers]
    try:
        with evaluation(model), torch.no_grad():
            for x in inputs.split(batch_size):
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    variance = {n: (sq / count - (total / count) ** 2).clamp_(min=0).cpu() for n, (count, total, sq) in moments.items()}
    scores = {}
    for name, group in space.groups.items():
        reads = [s for s in group.slices if s.dim == 1 and s.layer in variance]
        if not reads:
            scores[name] = space.weight_norms(name)
            continue
        total = torch.zeros(group.size, dtype=torch.float64)
        for s in reads:
            weight = space.layers[s.layer].weight.detach().double()
            columns = weight.transpose(0, 1).reshape(weight.shape[1], -1).pow(2).sum(dim=1).cpu()
            total += (variance[s.layer] * columns)[s.index].sum(dim=1)
        scores[name] = total
    return scores


RANKINGS: dict[str, Callable[..., Scores | None]] = {"l2": l2_scores, "taylor": taylor_scores, "bn_scale": bn_scale_scores,
                                                      "activation": activation_scores}
"""The rankings by name; ``taylor`` takes (space, inputs, labels, batch_size), ``activation`` (space, inputs,
batch_size), the others the space alone."""
NEEDS_LABELS = ("taylor",)
NEEDS_INPUTS = ("taylor", "activation")


def rank_channels(space: ChannelSpace, ranking: str, inputs: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                  batch_size: int = 64) -> None:
    """Score the space's channels by ``ranking`` (on ``inputs`` and ``labels`` where it needs data) and rank by it."""
    if ranking not in RANKINGS:
        raise ValueError(f"unknown channel ranking {ranking!r}: choose one of {', '.join(RANKINGS)}")
    if ranking in NEEDS_LABELS:
        if inputs is None or labels is None:
            raise ValueError(f"ranking {ranking!r} needs calibration images and their labels")
        scores = RANKINGS[ranking](space, inputs, labels, batch_size)
    elif ranking in NEEDS_INPUTS:
        if inputs is None:
            raise ValueError(f"ranking {ranking!r} needs calibration inputs")
        scores = RANKINGS[ranking](space, inputs, batch_size)
    else:
        scores = RANKINGS[ranking](space)
    space.rank(ranking, scores)
