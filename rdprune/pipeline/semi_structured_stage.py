"""2:4 granularity in the run loop: candidates and costs, the layers made 2:4 per iteration, the final report.

The loop is the one of every granularity: an iteration turns a target into masks, applies them,
recalibrates, fine-tunes (the masks hold the pruned weights at zero). Here a target becomes the set
of candidate layers made 2:4 (RD on their curves sharded over ranks, or the ``glob`` baseline;
chosen on rank 0 and broadcast), and the masks are those layers' 2:4 masks. Which layers are 2:4 is
read from the weights themselves, so a resumed run needs no state beyond the model.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from rdprune import distributed
from rdprune.config import Config
from rdprune.core.grid import Curve
from rdprune.core.masks import Masks
from rdprune.core.semi_structured import (
    TwoFourCost,
    allocate_two_four,
    apply_two_four,
    candidates,
    current_two_four,
    glob_two_four,
    latency_cost,
    layer_cost,
    weight_cost,
)
from rdprune.core.semi_structured_latency import (
    EXPORT_TOLERANCE,
    backend,
    export_difference,
    kernels_missing,
    layer_latency_us,
    linear_input_shapes,
    model_latency_s,
    to_semi_structured,
)
from rdprune.distributed import DistInfo
from rdprune.distributed.sharded_curves import sharded_semi_structured_curves
from rdprune.errors import UserError
from rdprune.files import write_json
from rdprune.pipeline.run_dir import RunLayout

log = logging.getLogger(__name__)

TABLE_FORMAT = "rdprune-2to4-latency/1"


@dataclass
class SemiStructuredStage:
    """What a 2:4 run keeps between iterations."""

    layers: dict[str, nn.Linear]  # the candidates, in declaration order
    left_out: list[tuple[str, str]]  # prunable layers that are no candidate, with the reason
    cost: TwoFourCost
    flops: dict[str, int]  # dense FLOPs per sample of the prunable layers, in execution order (shards curves)
    input_shape: tuple[int, ...]
    table: dict | None  # the measured latency table (latency budget)


def build_stage(cfg: Config, model: nn.Module, input_shape: tuple[int, ...], dist: DistInfo, out: RunLayout,
                flops: dict[str, int], total_weights: int) -> SemiStructuredStage:
    """Candidates and the budget's costs, checked before any work; a latency budget first needs the GPU's 2:4 kernels.

    ``total_weights`` counts every prunable layer's weights (skipped ones included), the unit of a
    weights budget. For a latency budget rank 0 measures the layers (or reloads the table of the
    run being resumed) and every rank gets the table; candidates that 2:4 does not make faster
    there are left out.
    """
    device = latency_device(cfg, dist) if cfg.prune.budget == "latency" else None
    layers, left_out = candidates(model, cfg.prune.skip)
    if not layers:
        linear_first = sorted(left_out, key=lambda entry: "nn.Linear layers only" in entry[1])  # the telling reasons
        raise UserError(f"no layer of {cfg.model.name} can go 2:4 ({'; '.join(f'{n}: {r}' for n, r in linear_first[:2])}"
                        f"{' ...' if len(left_out) > 2 else ''}); prune.granularity semi_structured needs nn.Linear layers "
                        "with out_features a multiple of 32 and in_features a multiple of 64")
    table = None
    if device is not None:
        table = _latency_table(cfg, model, input_shape, device, dist, out, layers)
        # A layer 2:4 already (from the checkpoint) stays a candidate even where 2:4 is not faster, priced as no
        # gain: left out, it would get no mask and fine-tuning would make it dense again.
        already = set(current_two_four(layers))
        slow = [n for n in layers if table["sparse_us"][n] >= table["dense_us"][n] and n not in already]
        left_out += [(n, f"2:4 is not faster on {table['device']}: dense {table['dense_us'][n]} us, 2:4 {table['sparse_us'][n]} us")
                     for n in slow]
        layers = {n: m for n, m in layers.items() if n not in slow}
        if not set(layers) - already:
            raise UserError(f"2:4 makes no candidate layer faster on {table['device']} at latency.batch_size "
                            f"{cfg.latency.batch_size}; choose prune.budget weights or layers, or a larger latency.batch_size")
        cost = latency_cost({n: table["dense_us"][n] for n in layers},
                            {n: min(table["sparse_us"][n], table["dense_us"][n]) for n in layers}, table["model_us"])
    elif cfg.prune.budget == "weights":
        cost = weight_cost(layers, total_weights)
    else:
        cost = layer_cost(layers)
    if left_out:
        log.info("2:4 candidates: %d layers; left out, dense: %s", len(layers), "; ".join(f"{n} ({r})" for n, r in left_out))
    if cfg.prune.target_sparsity > cost.reachable + 1e-12:
        raise UserError(f"prune.target_sparsity {cfg.prune.target_sparsity} is out of reach at granularity semi_structured: "
                        f"with all {len(layers)} candidate layers 2:4 at most {cost.reachable:.6f} of the {cfg.prune.budget} "
                        "can go; lower the target")
    return SemiStructuredStage(layers, left_out, cost, flops, tuple(input_shape), table)


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
    data = None
    if dist.is_main:
        if cfg.run.resume and out.latency_table.is_file():
            data = json.loads(out.latency_table.read_text())
            if (data.get("format") != TABLE_FORMAT or not set(layers) <= set(data.get("dense_us", {}))
                    or data.get("batch_size") != cfg.latency.batch_size or data.get("device") != torch.cuda.get_device_name(device)):
                raise UserError(f"{out.latency_table} is not a 2:4 latency table of this model at latency.batch_size "
                                f"{cfg.latency.batch_size} on {torch.cuda.get_device_name(device)}; delete it to measure a new "
                                "one, or set run.resume=false")
            log.info("2:4 latency table: reusing %s", out.latency_table)
        else:
            probe = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16).eval()
            example = _example(cfg, input_shape, device)
            log.info("2:4 latency table: timing %d layers dense and 2:4 at batch %d in bf16 on %s", len(layers),
                     cfg.latency.batch_size, torch.cuda.get_device_name(device))
            modules = dict(probe.named_modules())
            dense_us, sparse_us = layer_latency_us({n: modules[n] for n in layers}, linear_input_shapes(probe, layers, example),
                                                   device=device)
            model_s = model_latency_s([probe], example, cfg.latency.repeats)[0]
            data = {"format": TABLE_FORMAT, "device": torch.cuda.get_device_name(device), "backend": backend(), "dtype": "bfloat16",
                    "batch_size": cfg.latency.batch_size, "model_us": max(1, round(model_s * 1e6)),
                    "dense_us": dense_us, "sparse_us": sparse_us}
    return distributed.broadcast_object(data)


def _example(cfg: Config, input_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The batch whose latency counts: latency.batch_size seeded noise samples, in bf16 on ``device``."""
    x = torch.randn(cfg.latency.batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
    return x.to(device=device, dtype=torch.bfloat16)


def save_table(stage: SemiStructuredStage, out: RunLayout) -> None:
    """Keep the latency table in the run directory (rank 0), so a resumed run allocates with the same one."""
    if stage.table is not None and not out.latency_table.exists():
        write_json(out.latency_table, stage.table)


def masks_for(cfg: Config, dist: DistInfo, stage: SemiStructuredStage, model: nn.Module, inputs: torch.Tensor | None,
              target: float, cache_dir: str | os.PathLike, progress: bool) -> tuple[Masks, dict, dict[str, Curve] | None]:
    """This iteration's 2:4 layers (chosen on rank 0, the same on every rank) applied as masks; what the row records; the curves.

    ``inputs`` are the calibration inputs (RD only). Layers that are 2:4 already stay 2:4; the
    curves are rank 0's (``None`` elsewhere and for ``glob``).
    """
    current = current_two_four(stage.layers)
    curves = None
    if cfg.prune.method == "rd":
        curves = sharded_semi_structured_curves(
            model, stage.layers, inputs, worst_case=cfg.prune.distortion == "worst_case", batch_size=cfg.calibration.batch_size,
            flops=stage.flops, cache_dir=cache_dir, dist=dist, progress=progress,
        )
    chosen = info = None
    if dist.is_main:
        if curves is not None:
            alloc = allocate_two_four(curves, stage.cost, target, current)
        else:
            alloc = glob_two_four(stage.layers, stage.cost, target, current)
        chosen = alloc.layers
        log.info("2:4: %d of %d candidate layers 2:4, %.4f of the %s remaining (target: %.4f removed)", len(chosen),
                 len(stage.layers), alloc.cost / stage.cost.total, stage.cost.budget, target)
        info = {"layers_2to4": len(chosen), "candidates": len(stage.layers), "cost_remaining": alloc.cost / stage.cost.total}
        if alloc.distortion is not None:
            info["distortion_predicted"] = alloc.distortion
        if stage.cost.budget == "latency":
            info["latency_predicted_ms"] = alloc.cost / 1e3
            info["latency_dense_predicted_ms"] = stage.cost.total / 1e3
    chosen, info = distributed.broadcast_object((chosen, info))
    return apply_two_four(stage.layers, chosen), info, curves


def finish(cfg: Config, stage: SemiStructuredStage, model: nn.Module, out: RunLayout, device: torch.device) -> dict:
    """``final/semi_structured.json``: the layers made 2:4, the candidates, those left out and why; where the GPU's
    2:4 kernels are, the 2:4 model's measured latency beside the masked dense model's and their largest output difference."""
    chosen = current_two_four(stage.layers)
    report: dict = {
        "pattern": "2:4", "budget": cfg.prune.budget, "target_sparsity": cfg.prune.target_sparsity,
        "layers_2to4": chosen, "candidates": list(stage.layers),
        "left_out": [{"layer": n, "reason": r} for n, r in stage.left_out],
    }
    device = device if device.type == "cuda" else torch.device("cuda")
    reason = kernels_missing(device)
    if reason is not None:
        report["export"] = {"run": False, "reason": reason}
        log.info("the 2:4 model was not exported: %s", reason)
    else:
        try:
            report["export"] = _export(cfg, stage, model, chosen, device)
        except (RuntimeError, ValueError) as exc:  # a failed export must not keep the run from counting as finished
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("the 2:4 model was not exported: %s", reason)
            report["export"] = {"run": False, "reason": reason}
    write_json(out.final_semi_structured, report)
    return report


def _export(cfg: Config, stage: SemiStructuredStage, model: nn.Module, chosen: list[str], device: torch.device) -> dict:
    """The 2:4 model in bf16, checked against the masked dense model in bf16 and timed interleaved with it."""
    dense = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16).eval()
    sparse = to_semi_structured(model, chosen, device=device)
    example = _example(cfg, stage.input_shape, device)
    difference = export_difference(dense, sparse, example)
    dense_s, sparse_s = model_latency_s([dense, sparse], example, cfg.latency.repeats)
    within = difference <= EXPORT_TOLERANCE
    log.info("2:4 model (%d of %d candidates 2:4), bf16 at batch %d on %s: dense %.3f ms, 2:4 %.3f ms (%.2fx); largest output "
             "difference %.2e of the output range (tolerance %.0e)", len(chosen), len(stage.layers), len(example),
             torch.cuda.get_device_name(device), 1e3 * dense_s, 1e3 * sparse_s, dense_s / sparse_s, difference, EXPORT_TOLERANCE)
    if not within:
        log.error("the 2:4 model's outputs differ from the masked dense model's by %.2e of their range, more than %.0e",
                  difference, EXPORT_TOLERANCE)
    return {"run": True, "device": torch.cuda.get_device_name(device), "backend": backend(), "dtype": "bfloat16",
            "batch_size": len(example), "dense_ms": 1e3 * dense_s, "two_four_ms": 1e3 * sparse_s, "speedup": dense_s / sparse_s,
            "max_output_difference": difference, "tolerance": EXPORT_TOLERANCE, "within_tolerance": within}
