"""A toy granularity in a few lines, the proof that the seam holds: each prunable layer is a unit that keeps
all its weights or loses its smaller-magnitude half. Registered by importing this module (RDPRUNE_PLUGINS)."""
import numpy as np
import torch

from rdprune import distributed
from rdprune.core.allocation import allocate_levels, predicted_distortion
from rdprune.core.grid import Curve
from rdprune.core.layers import evaluation
from rdprune.core.masks import apply_masks, layer_sparsity
from rdprune.distributed.sharded_curves import sharded_unit_curves
from rdprune.distributed.sharding import Piece
from rdprune.granularity.base import Choice, GranularityStage
from rdprune.granularity.spec import GranularitySpec
from rdprune.registry import GRANULARITIES

SPEC = GRANULARITIES.register("halves", GranularitySpec(
    name="halves", unit="layer", form="halves", methods=("rd",), budgets=("weights",),
    plugin="dist_scripts.halves_granularity:HalvesStage"))


class HalvesStage(GranularityStage):
    spec = SPEC

    @classmethod
    def build(cls, setup):
        stage = cls(setup.layers, setup.flops, setup.skipped_weights, setup.skipped_flops)
        stage.cfg, stage.dist = setup.cfg, setup.dist
        return stage

    def _curve(self, model, batches, name):
        layer = self.layers[name]
        with torch.no_grad():
            reference = [model(b) for b in batches]
            kept = layer.weight.clone()
            apply_masks(model, {name: max(0.5, layer_sparsity({name: layer})[name])}, {name: layer})
            error = float(np.mean([(model(b) - r).double().pow(2).mean().item() for b, r in zip(batches, reference)]))
            layer.weight.copy_(kept)
        return Curve(np.array([0.0, 0.5]), np.array([0.0, error]))

    def choose(self, model, iteration, target, inputs, *, progress, labels=None):
        names, world = list(self.layers), self.dist.world_size
        batches = list(inputs.split(self.cfg.calibration.batch_size))
        with evaluation(model):
            curves = sharded_unit_curves(
                model, batches, self.dist, lambda: [[Piece(n, 0, 2) for n in names[r::world]] for r in range(world)],
                lambda mine: {p.unit: self._curve(model, batches, p.unit) for p in mine}, names, "halves curves")
        levels = info = None
        if self.dist.is_main:
            sizes = {n: m.weight.numel() for n, m in self.layers.items()}
            costs = {n: np.array([s, s - s // 2]) for n, s in sizes.items()}
            limit = int((1 - target) * (sum(sizes.values()) + self.dense_weights)) - self.dense_weights
            halved = {n for n, a in layer_sparsity(self.layers).items() if a >= 0.5}
            levels, _ = allocate_levels(curves, costs, limit, first={n: 1 for n in halved})
            info = {"distortion_predicted": predicted_distortion(curves, levels)}
        levels, info = distributed.broadcast_object((levels, info))
        amounts = {n: max(0.5 * levels[n], a) for n, a in layer_sparsity(self.layers).items()}
        return Choice(apply_masks(model, amounts, self.layers), info, curves)
