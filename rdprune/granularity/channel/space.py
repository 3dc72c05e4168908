"""Coupled channel groups: the units of channel granularity.

Removing channel c of a convolution's output also removes it from every layer tied to it: the
BatchNorm after it, the input slices of the layers that read it, and through residual additions,
concatenations and depthwise convolutions, the channels of other layers. Torch-Pruning's
``DependencyGraph`` finds these ties; each group of tied channels is one unit of the allocation.

Channels are pruned with masks, not removed, while rdprune works: a removed channel has its weight
slices zeroed in every convolution and linear layer of its group, *including the consumers' input
slices*. Whatever a zeroed producer still emits (a BatchNorm shift through an activation) then
reaches no layer, so the masked network computes exactly what the physically smaller one does
(:func:`rdprune.granularity.channel.export.remove_channels` makes it at the end). The masks are ordinary weight
masks over the prunable layers, so fine-tuning, checkpoints and resume treat them like any others.

Importance of a channel: by default the L2 norm of all its weights in the group (producers' output
slices and consumers' input slices); :mod:`rdprune.granularity.channel.ranking` sets others (first-order
Taylor on calibration data, BatchNorm scale) with :meth:`ChannelSpace.rank`. A group's level n removes
its n least important channels. Removed channels (all their weights zero) always come first, whatever
the ranking, so levels only ever add to what is removed.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from rdprune.core.floor import check_min_density
from rdprune.core.layers import evaluation, prunable_layers
from rdprune.core.masks import Masks, current_masks
from rdprune.core.timing import layer_shapes
from rdprune.errors import UserError
from rdprune.granularity.channel.export import channel_change, require_torch_pruning


@dataclass(frozen=True)
class ChannelSlice:
    """Where a group's channels sit in one layer's weight: ``index[c]`` are the indices along ``dim`` of channel c."""

    layer: str
    dim: int  # 0: the layer's output channels, 1: its input channels
    index: torch.Tensor  # (group size, indices per channel), long, on the CPU

    @property
    def per_channel(self) -> int:
        return self.index.shape[1]


@dataclass(frozen=True)
class ChannelGroup:
    """One unit: ``size`` tied channels, named after the first layer called (in execution order) that produces them."""

    name: str
    size: int
    slices: tuple[ChannelSlice, ...]
    min_kept: int  # the floor: channels the group keeps at least
    norms: tuple[ChannelSlice, ...] = ()  # the BatchNorm layers of the group (dim 0: their per-channel parameters)


WEIGHTS_INSTEAD = ("prune individual weights instead (a run's config: prune.granularity weight; the Python API: "
                   "rdprune.estimate_curves, rdprune.allocate and rdprune.apply_masks)")
"""How every refusal of a model at channel granularity ends: the fix for the command line and for the Python API."""

_MASKABLE = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
"""Group members whose masking equals removal: weights masked per channel, or per-channel statistics."""


def _handler_dim(module: nn.Module, out_channel_fn: bool) -> int:
    """Weight dimension that a channel pruning handler cuts in a convolution or linear layer."""
    if is_depthwise(module):
        return 0  # one filter per channel: inputs and outputs tied
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        raise UserError(f"layer {module!r} is a grouped convolution (groups={module.groups}); channel granularity supports "
                        f"plain and depthwise convolutions; {WEIGHTS_INSTEAD}")
    return 0 if out_channel_fn else 1


class ChannelSpace:
    """The channel groups of a model and the masks that remove channels from them.

    ``skip`` names layers whose output channels stay (Torch-Pruning's ignored layers); the layer
    producing the network's output (the last prunable layer called) always stays, so the output
    units never change, and the input channels have no producer, so they stay too. Every group
    keeps at least ``max(1, ceil(min_density * size))`` channels.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, skip: Iterable[str] = (), min_density: float = 0.0):
        skip = list(skip)
        tp = require_torch_pruning()
        min_density = check_min_density(min_density)
        self.model = model
        self.input_shape = tuple(example.shape[1:])  # one sample's shape, what the FLOPs counter runs
        self.ranking, self._scores = "l2", None
        every = prunable_layers(model)
        prunable_layers(model, skip)  # a skipped name that is no layer is an error
        with evaluation(model):
            order = list(layer_shapes(model, example))  # the layers the forward pass calls, in call order
        # Every conv and linear layer called: consumers of skipped groups get masks too. One never
        # called is in no group and costs nothing.
        self.layers = {n: every[n] for n in order}
        self.output_layer = order[-1]
        ignored = [every[n] for n in {*skip, self.output_layer}]
        names = {m: n for n, m in model.named_modules()}
        position = {n: i for i, n in enumerate(order)}
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():  # the graph is read from autograd
                graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
            groups = [self._group(tp, g, graph, names, position, min_density) for g in graph.get_all_groups(
                ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear])]
        finally:
            model.train(was_training)
        groups = [g for g in groups if g.slices and g.min_kept < g.size]
        self.groups: dict[str, ChannelGroup] = {
            g.name: g for g in sorted(groups, key=lambda g: min(position.get(s.layer, len(order)) for s in g.slices))}
        if not self.groups:
            raise UserError(f"model {type(model).__name__} has no channel group that can lose a channel "
                            f"(the output layer {self.output_layer} and the skipped layers, prune.skip / skip=, stay whole); "
                            f"{WEIGHTS_INSTEAD}")

    def _group(self, tp: ModuleType, group: object, graph: object, names: Mapping[nn.Module, str], position: Mapping[str, int],
               min_density: float) -> ChannelGroup:
        root = group.items[0].dep.target.module
        size = root.weight.shape[0]
        slices: dict[tuple[str, int], ChannelSlice] = {}
        norms: dict[str, ChannelSlice] = {}
        for item in group.items:
            dep, idxs = item.dep, item.idxs
            module = dep.target.module
            change = channel_change(dep.target.grad_fn) if dep.target.type == tp.ops.OPTYPE.ELEMENTWISE else None
            if change is not None:
                raise UserError(
                    f"the channels of {names[root]} pass through {type(dep.target.grad_fn).__name__}, which maps {change[0]} "
                    f"channels to {change[1]} (e.g. a shortcut that pads channels): torch-pruning's dependency graph cannot "
                    f"follow it; {WEIGHTS_INSTEAD}")
            if not isinstance(module, _MASKABLE) and any(True for _ in module.parameters(recurse=False)):
                raise UserError(
                    f"layer {names.get(module, module)} ({type(module).__name__}) in the channel group of {names[root]} has "
                    "parameters but is not a convolution, linear or BatchNorm layer: masking its channels would not equal "
                    f"removing them (e.g. GroupNorm or LayerNorm normalise across channels); {WEIGHTS_INSTEAD}")
            counts = getattr(module, "num_features", None)
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                dim = _handler_dim(module, graph.is_out_channel_pruning_fn(dep.handler))
                counts = module.weight.shape[dim]
            if counts is None:
                continue  # parameter-free ops (activations, additions, pooling): nothing to mask
            roots = torch.tensor([int(i) for i in item.root_idxs], dtype=torch.long)
            local = torch.tensor([int(i) for i in idxs], dtype=torch.long)
            per = len(idxs) // size
            consistent = (per * size == len(idxs) and bool((torch.bincount(roots, minlength=size) == per).all())
                          and bool(((local >= 0) & (local < counts)).all()))
            if not consistent:
                raise UserError(
                    f"the dependency graph maps the {size} channels of {names[root]} inconsistently onto layer "
                    f"{names.get(module, module)} ({counts} channels): this model's graph cannot be analysed at channel "
                    f"granularity; {WEIGHTS_INSTEAD}")
            by_root = local[torch.argsort(roots, stable=True)].view(size, per)
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                slices[(names[module], dim)] = ChannelSlice(names[module], dim, by_root)
            else:
                norms[names[module]] = ChannelSlice(names[module], 0, by_root)
        floor = max(1, math.ceil(min_density * size - 1e-9))
        producers = [s.layer for s in slices.values() if s.dim == 0] or [names[root]]
        first = min(producers, key=lambda n: position.get(n, len(position)))
        return ChannelGroup(first, size, tuple(slices.values()), floor, tuple(norms.values()))

    def _channel_weights(self, s: ChannelSlice) -> torch.Tensor:
        """The layer's weight viewed as (group channel, everything of that channel)."""
        w = self.layers[s.layer].weight.detach()
        w = w.transpose(0, 1) if s.dim == 1 else w
        return w[s.index.to(w.device)].reshape(s.index.shape[0], -1)

    def weight_norms(self, group: str) -> torch.Tensor:
        """L2 norm of each channel's weights over the whole group (float64, CPU); zero for a removed channel."""
        g = self.groups[group]
        total = torch.zeros(g.size, dtype=torch.float64)
        for s in g.slices:
            total += self._channel_weights(s).double().pow(2).sum(dim=1).cpu()
        return total.sqrt()

    def rank(self, ranking: str, scores: Mapping[str, torch.Tensor] | None = None) -> None:
        """Rank channels by ``scores`` (``{group: score per channel}``, higher = more important) under the name
        ``ranking``; ``scores`` None ranks by :meth:`weight_norms` (``l2``), which follows the weights as they change."""
        if scores is not None:
            wrong = {g: tuple(s.shape) for g, s in scores.items() if g not in self.groups or s.shape != (self.groups[g].size,)}
            if wrong or set(scores) != set(self.groups):
                raise ValueError(f"ranking {ranking!r} needs one score per channel of every group; got shapes "
                                 f"{wrong or 'for other groups'}")
        self.ranking = ranking
        self._scores = None if scores is None else {g: s.detach().double().cpu() for g, s in scores.items()}

    def importance(self, group: str) -> torch.Tensor:
        """Each channel's score under the ranking (float64, CPU, >= 0); exactly zero for a removed channel."""
        return self._scores_and_removed(group)[0]

    def removal_order(self, group: str) -> torch.Tensor:
        """Channel indices, removed ones first, then least important first (ties by index): level n removes the first n."""
        scores, removed = self._scores_and_removed(group)
        return torch.sort(torch.where(removed, -1.0, scores), stable=True).indices

    def _scores_and_removed(self, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The ranking's scores (zero where removed) and which channels are removed, from one pass over the weights."""
        norms = self.weight_norms(group)
        removed = norms == 0
        if self._scores is None:
            return norms, removed
        return torch.where(removed, 0.0, self._scores[group].abs()), removed

    def removed(self, group: str) -> int:
        """Channels of the group already removed (all their weights zero)."""
        return int((self.weight_norms(group) == 0).sum())

    def max_removed(self, group: str) -> int:
        g = self.groups[group]
        return g.size - g.min_kept

    def group_masks(self, group: str, count: int, order: torch.Tensor | None = None) -> Masks:
        """Masks of the group's layers alone, with its ``count`` least important channels removed.

        ``order`` is :meth:`removal_order` computed earlier (before the weights were changed).
        """
        g = self.groups[group]
        if not 0 <= count <= g.size:
            raise ValueError(f"group {group!r} has {g.size} channels; cannot remove {count}")
        return self._channel_masks(group, (self.removal_order(group) if order is None else order)[:count])

    def channels_for(self, removal: Mapping[str, int]) -> dict[str, list[int]]:
        """The channels (positions in each group) that ``removal`` counts take: the first of :meth:`removal_order`."""
        return {g: sorted(self.removal_order(g)[:n].tolist()) for g, n in removal.items()}

    def channel_masks(self, channels: Mapping[str, Iterable[int]]) -> Masks:
        """Masks of every prunable layer: its current zeros, and the named channels of each group removed
        (a choice of explicit channels, as a peer pruner makes it)."""
        masks = current_masks(self.layers)
        for group, chosen in channels.items():
            for layer, mask in self._channel_masks(group, torch.tensor(sorted(chosen), dtype=torch.long)).items():
                masks[layer] &= mask
        return masks

    def channel_indices(self, channels: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
        """Output channels of each group's named layer that the named group channels are, for
        :func:`rdprune.granularity.channel.export.remove_channels`."""
        found = {}
        for g, chosen in channels.items():
            chosen = sorted(chosen)
            if chosen:
                own = next(s for s in self.groups[g].slices if s.layer == g and s.dim == 0)
                found[g] = sorted(own.index[torch.tensor(chosen, dtype=torch.long)].reshape(-1).tolist())
        return found

    def _channel_masks(self, group: str, channels: torch.Tensor) -> Masks:
        g = self.groups[group]
        if len(channels) and not (0 <= int(channels.min()) and int(channels.max()) < g.size):
            raise ValueError(f"group {group!r} has {g.size} channels; cannot remove channels {channels.tolist()[:8]}")
        masks: Masks = {}
        for s in g.slices:
            weight = self.layers[s.layer].weight
            mask = masks.get(s.layer)
            if mask is None:
                mask = torch.ones_like(weight, dtype=torch.bool)
            view = mask.transpose(0, 1) if s.dim == 1 else mask
            view[s.index[channels].reshape(-1).to(weight.device)] = False
            masks[s.layer] = mask
        return masks

    def masks(self, removal: Mapping[str, int]) -> Masks:
        """Masks of every prunable layer: its current zeros, and each named group's ``removal[g]`` channels removed."""
        unknown = sorted(set(removal) - set(self.groups))
        if unknown:
            raise ValueError(f"unknown channel groups {unknown[:5]}; groups are {list(self.groups)[:8]} ...")
        masks = current_masks(self.layers)
        for group, count in removal.items():
            for layer, mask in self.group_masks(group, count).items():
                masks[layer] &= mask
        return masks

    def removed_indices(self, removal: Mapping[str, int]) -> dict[str, list[int]]:
        """Output channels of each group's named layer that its removal takes, for
        :func:`rdprune.granularity.channel.export.remove_channels`."""
        return self.channel_indices(self.channels_for({g: n for g, n in removal.items() if n > 0}))

    def kept_channels(self, removal: Mapping[str, int]) -> dict[str, tuple[int, int]]:
        """(input, output) channels every convolution and linear layer keeps under ``removal`` (others unchanged)."""
        kept = {}
        for name, m in self.layers.items():
            out = m.weight.shape[0]
            kept[name] = [out, out if is_depthwise(m) else m.weight.shape[1]]  # indexed by weight dimension
        for group, count in removal.items():
            for s in self.groups[group].slices:
                kept[s.layer][s.dim] -= count * s.per_channel
                if is_depthwise(self.layers[s.layer]):
                    kept[s.layer][1] = kept[s.layer][0]
        return {n: (v[1], v[0]) for n, v in kept.items()}


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels == module.out_channels
