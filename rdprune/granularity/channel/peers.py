"""The peers' own pruners as channel baselines: Torch-Pruning chooses the channels, rdprune does the rest.

Methods ``tp_l2`` (L2 magnitude, one ratio for every layer), ``tp_l2_global``, ``tp_taylor_global``,
``tp_bn_scale_global`` and ``tp_lamp_global`` (one global ranking, Torch-Pruning's normalised
group importance) run ``torch_pruning.pruner.MetaPruner`` itself, in interactive mode: it names the
channels it would remove, and rdprune masks exactly those (the same network Torch-Pruning's own
``group.prune()`` makes, as the export then makes it physically). Parity with RD:

- the budget: Torch-Pruning's ``pruning_ratio`` is fitted by bisection until the removal meets the
  same limit on the same counter as RD's (:class:`ChannelCost`: weights, or the FLOPs of the
  convolution and linear layers as they run);
- ``max_pruning_ratio`` is ``1 - prune.min_density``, and no group goes below its floor (a group
  where Torch-Pruning would take more keeps its most important channels by Torch-Pruning's order);
- ``ignored_layers`` are the output layer and ``prune.skip``;
- Taylor importance takes its gradients from the cross-entropy loss on the calibration images.

Channels removed earlier (iterative schedule) have zero weights, so every importance ranks them
first; they are kept removed in any case.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from rdprune.core.layers import evaluation
from rdprune.granularity.channel.export import require_torch_pruning
from rdprune.granularity.channel.space import ChannelSpace

PEERS: dict[str, tuple[str, bool]] = {
    "tp_l2": ("l2", False),
    "tp_l2_global": ("l2", True),
    "tp_taylor_global": ("taylor", True),
    "tp_bn_scale_global": ("bn_scale", True),
    "tp_lamp_global": ("lamp", True),
}
"""Method -> (Torch-Pruning importance, global ranking)."""
NEEDS_LABELS = ("tp_taylor_global",)
_BISECTION_STEPS = 24

Channels = dict[str, list[int]]


def _importance(tp: Any, kind: str) -> Any:
    importance = tp.importance
    return {"l2": lambda: importance.MagnitudeImportance(p=2), "taylor": importance.TaylorImportance,
            "bn_scale": importance.BNScaleImportance, "lamp": lambda: importance.LAMPImportance(p=2)}[kind]()


class PeerPruner:
    """Torch-Pruning's choice of channels at a pruning ratio, in the positions of ``space``'s groups."""

    def __init__(self, method: str, space: ChannelSpace, example: torch.Tensor, ignored: list[str], max_ratio: float):
        self.tp = require_torch_pruning()
        self.kind, self.global_pruning = PEERS[method]
        self.space, self.example, self.max_ratio = space, example, max_ratio
        modules = dict(space.model.named_modules())
        self.ignored = [modules[n] for n in ignored]
        self.names = {m: n for n, m in space.model.named_modules()}
        self._pruner: Any = None
        self.position = {(s.layer, int(i)): (g, c) for g, group in space.groups.items() for s in group.slices if s.dim == 0
                         for c, row in enumerate(s.index.tolist()) for i in row}

    def channels(self, ratio: float) -> Channels:
        """The channels Torch-Pruning removes at ``ratio`` (every group, current removals kept, floors held).

        One ``MetaPruner`` (its dependency graph traced once) serves every ratio: re-targeted as its own
        constructor sets a ratio, and ``reset()`` before each interactive step, which prunes nothing.
        """
        model = self.space.model
        with evaluation(model), torch.enable_grad():  # the dependency graph is read from autograd
            if self._pruner is None:
                self._pruner = self.tp.pruner.MetaPruner(
                    model, self.example, importance=_importance(self.tp, self.kind), global_pruning=self.global_pruning,
                    pruning_ratio=ratio, max_pruning_ratio=self.max_ratio, ignored_layers=self.ignored)
            pruner = self._pruner
            pruner.pruning_ratio = ratio
            pruner.per_step_pruning_ratio = pruner.iterative_pruning_ratio_scheduler(ratio, pruner.iterative_steps)
            pruner.reset()
            chosen: dict[str, set[int]] = {g: set() for g in self.space.groups}
            for group in pruner.step(interactive=True):
                for item in group:
                    dep, idxs = item.dep, item.idxs
                    name = self.names.get(dep.target.module)
                    if (isinstance(dep.target.module, (nn.Conv2d, nn.Linear))
                            and pruner.DG.is_out_channel_pruning_fn(dep.handler)):
                        for i in idxs:
                            found = self.position.get((name, int(i)))
                            if found is not None:
                                chosen[found[0]].add(found[1])
        return {g: self._within_floor(g, picked) for g, picked in chosen.items()}

    def _within_floor(self, group: str, picked: set[int]) -> list[int]:
        removed = set(self.space.removal_order(group)[:self.space.removed(group)].tolist())
        channels = sorted(removed | picked)
        most = self.space.max_removed(group)
        if len(channels) > most:  # keep the removed ones, then the first by rdprune's ranking
            order = self.space.removal_order(group).tolist()
            channels = sorted(sorted(channels, key=order.index)[:most])
        return channels


def peer_channels(method: str, space: ChannelSpace, cost: Callable[[Mapping[str, int]], float], limit: float,
                  example: torch.Tensor, ignored: list[str], min_density: float,
                  inputs: torch.Tensor | None = None, labels: torch.Tensor | None = None, batch_size: int = 64) -> Channels:
    """The channels ``method`` removes so that ``cost`` (of the removed counts) is at most ``limit``: the largest
    Torch-Pruning ratio that meets it, by bisection. Taylor's gradients come from ``inputs`` and ``labels``."""
    if method not in PEERS:
        raise ValueError(f"unknown peer method {method!r}: choose one of {', '.join(PEERS)}")
    pruner = PeerPruner(method, space, example, ignored, max_ratio=1.0 - min_density)
    model = space.model
    grads = {n: p.grad for n, p in model.named_parameters()}
    try:
        if method in NEEDS_LABELS:
            if inputs is None or labels is None:
                raise ValueError(f"{method} needs calibration images and their labels")
            model.zero_grad(set_to_none=True)
            with evaluation(model), torch.enable_grad():
                for x, y in zip(inputs.split(batch_size), labels.split(batch_size)):
                    # the mean loss over every batch: each batch's share, accumulated in .grad
                    (nn.functional.cross_entropy(model(x), y, reduction="sum") / len(inputs)).backward()

        def counted(channels: Channels) -> float:
            return cost({g: len(c) for g, c in channels.items()})

        best = pruner.channels(0.0)
        if counted(best) <= limit:
            return best
        top = pruner.channels(1.0 - min_density)
        if counted(top) > limit:
            raise ValueError(f"budget cannot be met by {method}: at Torch-Pruning's largest ratio the cost is "
                             f"{counted(top):.6g}, the budget {limit:.6g}")
        lo, hi, best = 0.0, 1.0 - min_density, top
        for _ in range(_BISECTION_STEPS):
            mid = (lo + hi) / 2
            channels = pruner.channels(mid)
            if counted(channels) <= limit:
                hi, best = mid, channels
            else:
                lo = mid
        return best
    finally:
        for n, p in model.named_parameters():
            p.grad = grads[n]
