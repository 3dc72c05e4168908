"""What a channel removal costs: the weights, FLOPs or predicted latency of the model that keeps the rest.

With channels no budget is additive over groups: a convolution's weights and FLOPs are
proportional to (input channels kept) x (output channels kept), and those come from two groups.
:class:`ChannelCost` evaluates the true (non-separable) cost of a whole removal; for weights and
FLOPs it also gives a separable *lower bound* (McCormick: ``a*b >= a_min*b + b_min*a - a_min*b_min``
for ``a >= a_min, b >= b_min``), which turns the allocation into a relaxation whose exact optimum
bounds the best distortion any removal on the level grid can reach under the budget.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, Protocol, get_args

from rdprune.granularity.channel.space import ChannelSpace, is_depthwise

ChannelBudget = Literal["weights", "flops", "latency"]


class LatencyModel(Protocol):
    """Predicted seconds of one forward pass when each layer keeps ``kept[name] = (in, out)`` channels."""

    def predict(self, kept: Mapping[str, tuple[int, int]]) -> float: ...


class ChannelCost:
    """The cost of a removal ``{group: channels removed}`` under one budget.

    ``flops`` are the dense FLOPs per sample of every convolution and linear layer (needed for
    ``flops``), ``latency`` the latency model (needed for ``latency``).
    """

    def __init__(self, space: ChannelSpace, budget: ChannelBudget, *, flops: Mapping[str, int] | None = None,
                 latency: LatencyModel | None = None):
        self.space, self.budget, self.latency = space, budget, latency
        if budget not in get_args(ChannelBudget):
            raise ValueError(f"unknown channel budget {budget!r}: choose one of {', '.join(get_args(ChannelBudget))}")
        if budget == "latency" and latency is None:
            raise ValueError("a latency budget needs a latency model")
        if budget == "flops" and flops is None:
            raise ValueError("a FLOPs budget needs the layers' dense FLOPs")
        self._dense_in_out = space.kept_channels({})
        self._scale = {n: float(m.weight.numel() if budget != "flops" else flops[n]) for n, m in space.layers.items()}
        self._min_in_out = space.kept_channels({g: space.max_removed(g) for g in space.groups})
        self.dense = self({})

    @property
    def total(self) -> float:
        """The dense model's cost (:class:`rdprune.core.allocation.Cost`); the same as ``dense``."""
        return self.dense

    def _layer(self, name: str, kept_in: float, kept_out: float) -> float:
        dense_in, dense_out = self._dense_in_out[name]
        if is_depthwise(self.space.layers[name]):
            return self._scale[name] * kept_out / dense_out
        return self._scale[name] * kept_in * kept_out / (dense_in * dense_out)

    def __call__(self, removal: Mapping[str, int]) -> float:
        kept = self.space.kept_channels(removal)
        if self.budget == "latency":
            return float(self.latency.predict(kept))
        return sum(self._layer(n, i, o) for n, (i, o) in kept.items())

    @property
    def has_lower_bound(self) -> bool:
        """Weights and FLOPs are bilinear in the kept channels and have one; a measured latency table has none."""
        return self.budget != "latency"

    def _envelope(self, name: str, corner: tuple[int, int]) -> Callable[[float, float], float]:
        """The McCormick under-estimator of the layer's cost through ``corner`` (exact on the lines through it)."""
        return lambda a, b: self._layer(name, corner[0], b) + self._layer(name, a, corner[1]) - self._layer(name, *corner)

    def lower_bound(self, removal: Mapping[str, int], anchor: Mapping[str, int]) -> float:
        """A cost at or below ``self(removal)`` for every removal within the groups' floors, affine in the removed counts.

        Per layer, ``kept_in * kept_out`` is bounded below by the McCormick envelope through the
        floors or the one through the dense counts, whichever is higher at ``anchor`` (both are
        valid everywhere; the choice only decides where the bound is tight).
        """
        if not self.has_lower_bound:
            raise ValueError("a latency budget has no separable lower bound")
        total = 0.0
        at_anchor = self.space.kept_channels(anchor)
        for name, (i, o) in self.space.kept_channels(removal).items():
            if is_depthwise(self.space.layers[name]):
                total += self._layer(name, i, o)
                continue
            envelopes = [self._envelope(name, self._min_in_out[name]), self._envelope(name, self._dense_in_out[name])]
            tight = max(envelopes, key=lambda e: e(*at_anchor[name]))
            total += tight(i, o)
        return total


def channel_cost(space: ChannelSpace, budget: ChannelBudget, *, latency: LatencyModel | None = None) -> ChannelCost:
    """The cost of removals from ``space`` under ``budget``, counted as the pipeline and every baseline count it.

    ``flops`` counts the FLOPs of every convolution and linear layer as it runs (two per multiply-accumulate
    of kept input x kept output channels x output positions, :func:`rdprune.core.layers.layer_flops` on
    the space's example shape); normalisation, activations and pooling are not counted. ``latency`` needs
    a latency model (:class:`rdprune.LatencyTable`).
    """
    from rdprune.core.layers import layer_flops

    flops = layer_flops(space.model, space.layers, space.input_shape) if budget == "flops" else None
    return ChannelCost(space, budget, flops=flops, latency=latency)
