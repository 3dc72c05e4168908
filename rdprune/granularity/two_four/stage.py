"""2:4 granularity in the run loop: candidates and costs, the layers made 2:4 per iteration, the final report.

The loop is the one of every granularity: an iteration turns a target into masks, applies them,
recalibrates, fine-tunes (the masks hold the pruned weights at zero). Here a target becomes the set
of candidate layers made 2:4 (RD on their curves sharded over ranks, or the ``glob`` baseline;
chosen on rank 0 and broadcast), and the masks are those layers' 2:4 masks. Which layers are 2:4 is
read from the weights themselves, so a resumed run needs no state beyond the model.
"""
from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from rdprune import distributed
from rdprune.config import Config
from rdprune.core.distortion import Distortion
from rdprune.core.grid import Curve
from rdprune.core.masks import enforce_masks
from rdprune.distributed import DistInfo
from rdprune.distributed.sharded_curves import sharded_unit_curves, suffix_pieces
from rdprune.distributed.sharding import Piece
from rdprune.errors import UserError
from rdprune.files import write_json
from rdprune.granularity.base import Choice, GranularityStage, StageInputs, save_table, shared_table
from rdprune.granularity.two_four import SPEC
from rdprune.granularity.two_four.kernels import (
    EXPORT_TOLERANCE,
    backend,
    export_difference,
    kernels_missing,
    layer_latency_us,
    linear_input_shapes,
    model_latency_s,
    to_two_four,
)
from rdprune.granularity.two_four.units import (
    TwoFourCost,
    allocate_two_four,
    apply_two_four,
    candidates,
    current_two_four,
    estimate_two_four_curves,
    glob_two_four,
    latency_cost,
    layer_cost,
    unit_plan,
    weight_cost,
)

if TYPE_CHECKING:  # the run layout is the pipeline's: only its paths are used here
    from rdprune.pipeline.run_dir import RunLayout

log = logging.getLogger(__name__)

TABLE_FORMAT = "rdprune-2to4-latency/1"
REPORT = "semi_structured.json"
"""The end-of-run report in the run's final/ folder (its name is part of the output contract)."""


class TwoFourStage(GranularityStage):
    """Candidate Linear layers as units, each dense or 2:4; the 2:4 layers are read from the weights themselves."""

    spec = SPEC

    def __init__(self, setup: StageInputs, candidates: dict[str, nn.Linear], left_out: list[tuple[str, str]],
                 cost: TwoFourCost, table: dict | None):
        # Every prunable layer counts in the sparsity; only the candidates carry masks.
        super().__init__(setup.layers, setup.flops, setup.skipped_weights, setup.skipped_flops)
        self.cfg, self.dist, self.out = setup.cfg, setup.dist, setup.out
        self.candidates = candidates  # in declaration order
        self.left_out = left_out  # prunable layers that are no candidate, with the reason
        self.cost = cost
        self.input_shape = tuple(setup.input_shape)
        self.table = table  # the measured latency table (latency budget)

    @classmethod
    def precheck(cls, cfg: Config, dist: DistInfo) -> None:
        """A latency budget needs the GPU's 2:4 kernels: refused before any work where there are none."""
        if cfg.prune.budget == "latency":
            latency_device(cfg, dist)

    def units(self) -> list[str]:
        return list(self.candidates)

    def save_state(self, out: RunLayout) -> None:
        save_table(out.latency_table, self.table)

    @classmethod
    def build(cls, setup: StageInputs) -> TwoFourStage:
        """Candidates and the budget's costs, checked before any work; a latency budget first needs the GPU's 2:4 kernels.

        A weights budget counts every prunable layer's weights (skipped ones included). For a latency
        budget rank 0 measures the layers (or reloads the table of the run being resumed) and every
        rank gets the table; candidates that 2:4 does not make faster there are left out.
        """
        cfg, model = setup.cfg, setup.model
        device = latency_device(cfg, setup.dist) if cfg.prune.budget == "latency" else None
        layers, left_out = candidates(model, cfg.prune.skip)
        if not layers:
            linear_first = sorted(left_out, key=lambda entry: "nn.Linear layers only" in entry[1])  # the telling reasons
            raise UserError(f"no layer of {cfg.model.name} can go 2:4 ({'; '.join(f'{n}: {r}' for n, r in linear_first[:2])}"
                            f"{' ...' if len(left_out) > 2 else ''}); prune.granularity semi_structured needs nn.Linear layers "
                            "with out_features a multiple of 32 and in_features a multiple of 64")
        table = None
        if device is not None:
            table = _latency_table(cfg, model, setup.input_shape, device, setup.dist, setup.out, layers)
            # A layer 2:4 already (from the checkpoint) stays a candidate even where 2:4 is not faster, priced as no
            # gain: left out, it would get no mask and fine-tuning would make it dense again.
            already = set(current_two_four(layers))
            slow = [n for n in layers if table["sparse_us"][n] >= table["dense_us"][n] and n not in already]
            left_out += [(n, f"2:4 is not faster on {table['device']}: dense {table['dense_us'][n]} us, "
                             f"2:4 {table['sparse_us'][n]} us") for n in slow]
            layers = {n: m for n, m in layers.items() if n not in slow}
            if not set(layers) - already:
                raise UserError(f"2:4 makes no candidate layer faster on {table['device']} at latency.batch_size "
                                f"{cfg.latency.batch_size}; choose prune.budget weights or layers, or a larger latency.batch_size")
            cost = latency_cost({n: table["dense_us"][n] for n in layers},
                                {n: min(table["sparse_us"][n], table["dense_us"][n]) for n in layers}, table["model_us"])
        elif cfg.prune.budget == "weights":
            cost = weight_cost(layers, sum(m.weight.numel() for m in setup.layers.values()) + setup.skipped_weights)
        else:
            cost = layer_cost(layers)
        if left_out:
            log.info("2:4 candidates: %d layers; left out, dense: %s", len(layers), "; ".join(f"{n} ({r})" for n, r in left_out))
        if cfg.prune.target_sparsity > cost.reachable + 1e-12:
            raise UserError(f"prune.target_sparsity {cfg.prune.target_sparsity} is out of reach at granularity semi_structured: "
                            f"with all {len(layers)} candidate layers 2:4 at most {cost.reachable:.6f} of the {cfg.prune.budget} "
                            "can go; lower the target")
        return cls(setup, layers, left_out, cost, table)

    def choose(self, model: nn.Module, iteration: int, target: float, inputs: torch.Tensor | None, *,
               progress: bool, labels: torch.Tensor | None = None) -> Choice:
        """This iteration's 2:4 layers (chosen on rank 0, the same on every rank) applied as masks.

        Layers that are 2:4 already stay 2:4; the curves are rank 0's (``None`` elsewhere and for ``glob``).
        """
        cfg = self.cfg
        current = current_two_four(self.candidates)
        curves = None
        if cfg.prune.method == "rd":
            curves = sharded_two_four_curves(
                model, self.candidates, inputs, distortion=Distortion.named(cfg.prune.distortion),
                batch_size=cfg.calibration.batch_size, flops=self.flops,
                cache_dir=cfg.calibration.curve_cache or self.out.curve_cache(iteration), dist=self.dist, progress=progress,
            )
        chosen = info = None
        if self.dist.is_main:
            if curves is not None:
                alloc = allocate_two_four(curves, self.cost, target, current)
            else:
                alloc = glob_two_four(self.candidates, self.cost, target, current)
            chosen = alloc.choice
            log.info("2:4: %d of %d candidate layers 2:4, %.4f of the %s remaining (target: %.4f removed)", len(chosen),
                     len(self.candidates), alloc.cost / self.cost.total, self.cost.budget, target)
            info = {"layers_2to4": len(chosen), "candidates": len(self.candidates), "cost_remaining": alloc.cost / self.cost.total}
            if alloc.distortion is not None:
                info["distortion_predicted"] = alloc.distortion
            if self.cost.budget == "latency":
                info["latency_predicted_ms"] = alloc.cost / 1e3
                info["latency_dense_predicted_ms"] = self.cost.total / 1e3
        chosen, info = distributed.broadcast_object((chosen, info))
        masks = apply_two_four(self.candidates, chosen)
        enforce_masks(self.layers, masks)
        return Choice(masks, info, curves)

    def finish(self, model: nn.Module, out: RunLayout, device: torch.device) -> None:
        """``final/semi_structured.json``: the layers made 2:4, the candidates, those left out and why; where the GPU's
        2:4 kernels are, the 2:4 model's measured latency beside the masked dense model's and their largest output
        difference."""
        cfg = self.cfg
        chosen = current_two_four(self.candidates)
        report: dict = {
            "pattern": "2:4", "budget": cfg.prune.budget, "target_sparsity": cfg.prune.target_sparsity,
            "layers_2to4": chosen, "candidates": list(self.candidates),
            "left_out": [{"layer": n, "reason": r} for n, r in self.left_out],
        }
        device = device if device.type == "cuda" else torch.device("cuda")
        reason = kernels_missing(device)
        if reason is not None:
            report["export"] = {"run": False, "reason": reason}
            log.info("the 2:4 model was not exported: %s", reason)
        else:
            try:
                report["export"] = self._export(model, chosen, device)
            except (RuntimeError, ValueError) as exc:  # a failed export must not keep the run from counting as finished
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.error("the 2:4 model was not exported: %s", reason)
                report["export"] = {"run": False, "reason": reason}
        write_json(out.final / REPORT, report)

    def _export(self, model: nn.Module, chosen: list[str], device: torch.device) -> dict:
        """The 2:4 model in bf16, checked against the masked dense model in bf16 and timed interleaved with it."""
        dense = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16).eval()
        sparse = to_two_four(model, chosen, device=device)
        example = _example(self.cfg, self.input_shape, device)
        difference = export_difference(dense, sparse, example)
        dense_s, sparse_s = model_latency_s([dense, sparse], example, self.cfg.latency.repeats)
        within = difference <= EXPORT_TOLERANCE
        log.info("2:4 model (%d of %d candidates 2:4), bf16 at batch %d on %s: dense %.3f ms, 2:4 %.3f ms (%.2fx); largest "
                 "output difference %.2e of the output range (tolerance %.0e)", len(chosen), len(self.candidates), len(example),
                 torch.cuda.get_device_name(device), 1e3 * dense_s, 1e3 * sparse_s, dense_s / sparse_s, difference,
                 EXPORT_TOLERANCE)
        if not within:
            log.error("the 2:4 model's outputs differ from the masked dense model's by %.2e of their range, more than %.0e",
                      difference, EXPORT_TOLERANCE)
        return {"run": True, "device": torch.cuda.get_device_name(device), "backend": backend(), "dtype": "bfloat16",
                "batch_size": len(example), "dense_ms": 1e3 * dense_s, "two_four_ms": 1e3 * sparse_s,
                "speedup": dense_s / sparse_s, "max_output_difference": difference, "tolerance": EXPORT_TOLERANCE,
                "within_tolerance": within}


def latency_device(cfg: Config, dist: DistInfo) -> torch.device:
    """The CUDA device a latency budget is measured on, or the one-line reason there is none."""
    if cfg.latency.device is not None:
        device = torch.device(cfg.latency.device)
    else:
        device = dist.device if dist.device.type == "cuda" else torch.device("cuda")
    reason = kernels_missing(device)
    if reason is not None:
        raise UserError(f"prune.budget latency at granularity semi_structured cannot be measured here: {reason}; "
                        "choose prune.budget weights or layers")
    return device


def _latency_table(cfg: Config, model: nn.Module, input_shape: tuple[int, ...], device: torch.device, dist: DistInfo,
                   out: RunLayout, layers: dict[str, nn.Linear]) -> dict:
    """Microseconds of each candidate dense and 2:4, and of the dense model, in bf16 at latency.batch_size (rank 0, broadcast)."""
    name = torch.cuda.get_device_name(device) if dist.is_main else ""

    def check(data: dict) -> str | None:
        if (data.get("format") != TABLE_FORMAT or not set(layers) <= set(data.get("dense_us", {}))
                or data.get("batch_size") != cfg.latency.batch_size or data.get("device") != name):
            return f"it must time this model's candidates at latency.batch_size {cfg.latency.batch_size} on {name}"
        return None

    def build() -> dict:
        probe = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16).eval()
        example = _example(cfg, input_shape, device)
        log.info("2:4 latency table: timing %d layers dense and 2:4 at batch %d in bf16 on %s", len(layers),
                 cfg.latency.batch_size, name)
        modules = dict(probe.named_modules())
        dense_us, sparse_us = layer_latency_us({n: modules[n] for n in layers}, linear_input_shapes(probe, layers, example),
                                               device=device)
        model_s = model_latency_s([probe], example, cfg.latency.repeats)[0]
        return {"format": TABLE_FORMAT, "device": name, "backend": backend(), "dtype": "bfloat16",
                "batch_size": cfg.latency.batch_size, "model_us": max(1, round(model_s * 1e6)),
                "dense_us": dense_us, "sparse_us": sparse_us}

    return shared_table(out.latency_table, resume=cfg.run.resume, dist=dist, check=check, build=build,
                        what="2:4 latency table")


def _example(cfg: Config, input_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The batch whose latency counts: latency.batch_size seeded noise samples, in bf16 on ``device``."""
    x = torch.randn(cfg.latency.batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
    return x.to(device=device, dtype=torch.bfloat16)


def sharded_two_four_curves(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    inputs: torch.Tensor,
    *,
    distortion: Distortion,
    batch_size: int,
    flops: Mapping[str, int],
    cache_dir: str | os.PathLike | None,
    dist: DistInfo,
    progress: bool,
) -> dict[str, Curve] | None:
    """Every 2:4 candidate's curve on rank 0 (``None`` elsewhere); equal to :func:`estimate_two_four_curves`.

    A candidate's one paid level (its 2:4 mask) is a piece, balanced by the FLOPs from that layer
    on in execution order (``flops``; what the level re-runs); layers already 2:4 cost nothing.
    """
    batches = list(inputs.split(batch_size))

    def plan() -> list[list[Piece]]:
        return suffix_pieces({n: unit_plan(m) for n, m in layers.items()}, {n: n for n in layers}, flops, dist.world_size)

    def estimate(mine: list[Piece]) -> dict[str, Curve]:
        return estimate_two_four_curves(
            model, layers, batches, worst_case=distortion.worst_case, measure=distortion.measure, units=[p.unit for p in mine],
            level_ranges={p.unit: (p.start, p.stop) for p in mine}, batch_size=batch_size, cache_dir=cache_dir, progress=progress,
        )

    return sharded_unit_curves(model, batches, dist, plan, estimate, list(layers), "2:4 curve estimation")
