"""Weight granularity in the run loop: each prunable layer one unit, unstructured magnitude masks.

An iteration's target becomes per-layer absolute amounts: RD allocation on the layers' curves
(sharded over ranks, solved on rank 0, broadcast) or a baseline (rank 0, broadcast); the masks of
those amounts are then applied on every rank.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from rdprune import distributed
from rdprune.core.allocation import allocate, predicted_distortion
from rdprune.core.batchnorm import batch_statistics
from rdprune.core.distortion import Distortion
from rdprune.core.floor import max_sparsity
from rdprune.core.grid import Curve
from rdprune.core.masks import apply_masks, layer_sparsity
from rdprune.distributed.sharded_curves import sharded_curves
from rdprune.errors import UserError
from rdprune.granularity.base import Choice, GranularityStage, StageInputs
from rdprune.granularity.weight import SPEC
from rdprune.granularity.weight.baselines import baseline_amounts


class WeightStage(GranularityStage):
    """Prunable layers as units; skipped layers stay dense and count in the sparsity's denominator."""

    spec = SPEC

    def __init__(self, setup: StageInputs):
        super().__init__(setup.layers, setup.flops, setup.skipped_weights, setup.skipped_flops)
        self.cfg, self.dist, self.out = setup.cfg, setup.dist, setup.out

    @classmethod
    def build(cls, setup: StageInputs) -> WeightStage:
        stage = cls(setup)
        stage.check_reachable(setup.cfg.prune.target_sparsity)
        return stage

    def check_reachable(self, target: float) -> None:
        """The final target against the layers' floors, before any work: not a failure at the last iteration."""
        prune = self.cfg.prune
        flops = {"flops": self.flops, "dense_flops": self.dense_flops} if prune.budget == "flops" else {}
        reachable = max_sparsity(self.layers, prune.min_density, self.dense_weights, **flops)
        if target > reachable:
            counted = "FLOPs" if prune.budget == "flops" else "weights"
            raise UserError(
                f"prune.target_sparsity {target} is out of reach: with every layer keeping its floor "
                f"(one weight per output unit, and prune.min_density {prune.min_density} of its weights) and "
                f"prune.skip, at most {math.floor(reachable * 1e6) / 1e6:.6f} of the {counted} can go; "
                "lower the target or prune.min_density"
            )

    @property
    def _renormalised(self) -> bool:
        """BatchNorm-aware curves measured on one batch: the whole network is measured the same way."""
        cal = self.cfg.calibration
        return self.cfg.prune.bn_aware_curves and cal.batch_size >= cal.size

    @property
    def distortion_comparable(self) -> bool:
        # BatchNorm-aware curves over several batches follow the plain definition layer by layer; a pass of the
        # whole network with per-batch statistics is not that network.
        return not self.cfg.prune.bn_aware_curves or self._renormalised

    def measurement(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return batch_statistics(model) if self._renormalised else contextlib.nullcontext()

    def choose(self, model: nn.Module, iteration: int, target: float, inputs: torch.Tensor | None, *,
               progress: bool, labels: torch.Tensor | None = None) -> Choice:
        """Per-layer absolute amounts for this iteration, computed on rank 0 (curves on every rank), applied everywhere."""
        cfg = self.cfg
        curves: dict[str, Curve] | None = None
        if cfg.prune.method != "rd":
            amounts = None
            if self.dist.is_main:
                amounts = baseline_amounts(
                    cfg.prune.method, self.layers, target, dense_weights=self.dense_weights, budget=cfg.prune.budget,
                    flops=self.flops, dense_flops=self.dense_flops, min_density=cfg.prune.min_density,
                )
            amounts, info = distributed.broadcast_object(amounts), {}
        else:
            curves = sharded_curves(
                model, inputs, cfg.prune.levels, grid=cfg.prune.grid, distortion=Distortion.named(cfg.prune.distortion),
                skip=cfg.prune.skip, batch_size=cfg.calibration.batch_size,
                cache_dir=cfg.calibration.curve_cache or self.out.curve_cache(iteration), dist=self.dist, progress=progress,
                min_density=cfg.prune.min_density, bn_aware=cfg.prune.bn_aware_curves,
            )
            amounts = info = None
            if self.dist.is_main:
                amounts = allocate(
                    curves, {n: m.weight.numel() for n, m in self.layers.items()}, target, budget=cfg.prune.budget,
                    flops=self.flops, current=layer_sparsity(self.layers), dense_weights=self.dense_weights,
                    dense_flops=self.dense_flops,
                )
                info = {"distortion_predicted": predicted_distortion(
                    curves, {n: int(abs(c.amounts - amounts[n]).argmin()) for n, c in curves.items()})}
            amounts, info = distributed.broadcast_object((amounts, info))
        return Choice(apply_masks(model, amounts, self.layers), info, curves)
