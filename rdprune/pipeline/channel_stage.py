"""Channel granularity in the run loop: groups, costs, the latency model, the removal per iteration, the export.

The loop stays the same for both granularities: an iteration turns a target into masks, applies
them, recalibrates, fine-tunes. Here a target becomes a removal ``{group: channels}`` (RD on
channel curves sharded over ranks, or a baseline; chosen on rank 0 and broadcast), checked
against the **measured** latency when the budget is latency, and masks from it on every rank.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rdprune import distributed
from rdprune.config import Config
from rdprune.core.channel_allocation import allocate_channels, meet_measured_latency
from rdprune.core.channel_baselines import channel_baseline
from rdprune.core.channel_costs import ChannelCost
from rdprune.core.channel_curves import group_plan
from rdprune.core.channels import ChannelSpace
from rdprune.core.export import remove_channels, require_onnx, save_exported
from rdprune.core.grid import Curve
from rdprune.core.latency import LatencyTable, layer_shapes, measure_latency
from rdprune.core.layers import layer_flops
from rdprune.distributed import DistInfo
from rdprune.distributed.sharded_curves import sharded_channel_curves
from rdprune.errors import UserError
from rdprune.files import write_json
from rdprune.pipeline.run_dir import RunLayout

log = logging.getLogger(__name__)

WAIT_FACTOR = 2
"""distributed.timeout_s must be this many times latency.time_limit_s under several ranks: the limit
steers the table's build, it does not stop it, and the other ranks wait at a collective meanwhile."""


@dataclass
class ChannelStage:
    """What a channel-granularity run keeps between iterations."""

    space: ChannelSpace
    cost: ChannelCost
    flops: dict[str, int]
    table: LatencyTable | None
    latency_example: torch.Tensor  # the batch whose latency counts, on the latency device

    @property
    def device(self) -> torch.device:
        return self.latency_example.device


def build_stage(cfg: Config, model: nn.Module, input_shape: tuple[int, ...], dist: DistInfo, out: RunLayout) -> ChannelStage:
    """Groups and costs; for a latency budget the latency table (rank 0 measures or reloads it, every rank gets it)."""
    require_onnx()  # the export at the end needs it: say so now, not after the run
    example = torch.zeros(1, *input_shape, device=dist.device)
    try:
        space = ChannelSpace(model, example, skip=cfg.prune.skip, min_density=cfg.prune.min_density)
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from exc
    flops = layer_flops(model, space.layers, input_shape)
    device = torch.device(cfg.latency.device) if cfg.latency.device else dist.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("latency.device is cuda but CUDA is not available on this machine; measure on cpu, or run where "
                        "the deployment GPU is")
    latency_example = torch.randn(cfg.latency.batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    table = _latency_table(cfg, model, latency_example, dist, out) if cfg.prune.budget == "latency" else None
    cost = ChannelCost(space, cfg.prune.budget, flops=flops, latency=table)
    return ChannelStage(space, cost, flops, table, latency_example)


def check_latency_wait(cfg: Config, dist: DistInfo) -> None:
    """Refuse a collective timeout the latency table's build could outlast: the other ranks wait at a
    broadcast while rank 0 times the layers (checked on every rank alike, also when a resumed run
    would reuse its table, as only rank 0 can see that)."""
    if (cfg.prune.granularity == "channel" and cfg.prune.budget == "latency" and dist.is_distributed
            and cfg.distributed.timeout_s < WAIT_FACTOR * cfg.latency.time_limit_s):
        raise UserError(f"distributed.timeout_s {cfg.distributed.timeout_s} is too short for latency.time_limit_s "
                        f"{cfg.latency.time_limit_s:g}: the other ranks wait while rank 0 times the layers, which can take "
                        f"longer than the limit; set distributed.timeout_s to at least {WAIT_FACTOR * cfg.latency.time_limit_s:g} "
                        f"or lower latency.time_limit_s")


def _latency_table(cfg: Config, model: nn.Module, example: torch.Tensor, dist: DistInfo, out: RunLayout) -> LatencyTable:
    """The latency table: built (or reused) on rank 0 while the other ranks wait at the broadcast."""
    check_latency_wait(cfg, dist)
    data = None
    if dist.is_main:
        if cfg.run.resume and out.latency_table.is_file():
            try:
                data = json.loads(out.latency_table.read_text())
                LatencyTable.from_json(data)
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{out.latency_table} is not a readable latency table ({str(exc)[:120]}); delete it to "
                                "measure a new one, or set run.resume=false") from None
            log.info("latency table: reusing %s", out.latency_table)
        else:
            probe = copy.deepcopy(model).to(example.device).eval()
            log.info("latency table: timing the layers of %s at batch %d on %s (at most %.0f s)",
                     cfg.model.name, len(example), example.device, cfg.latency.time_limit_s)
            table = LatencyTable.build(probe, example, layer_shapes(probe, example), points=cfg.latency.points,
                                       device=example.device, threads=cfg.latency.threads,
                                       time_limit_s=cfg.latency.time_limit_s, progress=cfg.run.progress)
            data = table.to_json()
    return LatencyTable.from_json(distributed.broadcast_object(data))


def save_table(stage: ChannelStage, out: RunLayout) -> None:
    """Keep the latency table in the run directory (rank 0), so a resumed run solves with the same one."""
    if stage.table is not None and not out.latency_table.exists():
        write_json(out.latency_table, stage.table.to_json())


def check_reachable(stage: ChannelStage, target: float) -> None:
    """The final target against every group at its floor, before any work."""
    space = stage.space
    most = {g: space.max_removed(g) for g in space.groups}
    reachable = 1.0 - stage.cost(most) / stage.cost.dense
    if target > reachable:
        raise UserError(f"prune.target_sparsity {target} is out of reach at channel granularity: with every channel group "
                        f"at its floor at most {reachable:.6f} of the {stage.cost.budget} can go; lower the target or prune.min_density")


def removal_for(cfg: Config, dist: DistInfo, stage: ChannelStage, model: nn.Module, inputs: torch.Tensor | None, target: float,
                cache_dir: object, chosen_file: Path, progress: bool) -> tuple[dict[str, int], dict]:
    """This iteration's removal (the same on every rank) and what the results row records about it.

    ``inputs`` are the calibration inputs (RD only). The choice is kept in ``chosen_file`` until the
    iteration is recorded; an iteration resumed after an interruption reuses it instead of solving
    (and timing) again.
    """
    kept = None
    if dist.is_main and chosen_file.is_file():
        saved = json.loads(chosen_file.read_text())
        if saved.get("target") == target:
            kept = saved["removal"], saved["info"]
            log.info("reusing the removal chosen for this iteration before the interruption (%s)", chosen_file)
    if distributed.broadcast_object(kept is not None):
        return distributed.broadcast_object(kept)
    space, cost = stage.space, stage.cost
    current = {g: space.removed(g) for g in space.groups}
    curves = None
    if cfg.prune.method == "rd":
        curves = sharded_channel_curves(
            model, space, inputs, cfg.prune.levels, grid=cfg.prune.grid, worst_case=cfg.prune.distortion == "worst_case",
            batch_size=cfg.calibration.batch_size, flops=stage.flops, cache_dir=cache_dir, dist=dist, progress=progress,
        )
    chosen, info = None, {}
    if dist.is_main:
        plans = {g: group_plan(space, g, cfg.prune.levels, cfg.prune.grid) for g in space.groups}

        def solve(limit: float) -> tuple[dict[str, int], dict]:
            if curves is None:
                return channel_baseline(cfg.prune.method, space, cost, limit, current), {}
            alloc = allocate_channels(curves, plans, cost, limit)
            return alloc.removal, {"distortion_predicted": alloc.distortion, "distortion_lower_bound": alloc.lower_bound,
                                   "allocation_rounds": alloc.rounds}

        if cfg.prune.budget == "latency":
            details: dict = {}

            def solve_latency(limit: float) -> dict[str, int]:
                removal, extra = solve(limit)
                details.update(extra)
                return removal

            lat = cfg.latency
            checked = meet_measured_latency(
                solve_latency, lambda removal: _measure(stage, model, removal, lat.repeats, lat.threads), cost, cost.dense,
                1.0 - target, lat.correction_rounds)
            chosen = checked.removal
            info = {**details, "latency_predicted_ms": 1e3 * checked.predicted_s,
                    "latency_predicted_dense_ms": 1e3 * checked.predicted_dense_s, "latency_first_ms": 1e3 * checked.first_s,
                    "latency_first_dense_ms": 1e3 * checked.first_dense_s, "latency_model_error": checked.model_error,
                    "latency_model_error_absolute": checked.absolute_error, "latency_dense_ms": 1e3 * checked.dense_s,
                    "latency_ms": 1e3 * checked.pruned_s, "latency_speedup": checked.speedup,
                    "latency_corrections": checked.corrections}
        else:
            chosen, info = solve((1.0 - target) * cost.dense)
        info["cost_remaining"] = cost(chosen) / cost.dense
        info["channels_removed"] = sum(chosen.values())
        write_json(chosen_file, {"target": target, "removal": chosen, "info": info})
        if curves is not None:
            info["curves"] = {g: (curves[g].amounts.tolist(), curves[g].distortion.tolist()) for g in curves}
    chosen, info = distributed.broadcast_object((chosen, info))
    return chosen, info


def _measure(stage: ChannelStage, model: nn.Module, removal: dict[str, int], repeats: int, threads: int | None) -> tuple[float, float]:
    """(dense, pruned) seconds of one forward pass, the physically smaller copy timed interleaved with the dense one."""
    dense = copy.deepcopy(model).to(stage.device).eval()
    smaller = remove_channels(dense, stage.latency_example[:1], stage.space.removed_indices(removal))
    dense_s, pruned_s = measure_latency([dense, smaller], stage.latency_example, repeats=repeats, threads=threads, device=stage.device)
    return dense_s, pruned_s


def curves_of(info: dict) -> dict[str, Curve]:
    """The channel curves carried in a removal's info (rank 0's), for the curves file and plots."""
    return {g: Curve(np.asarray(a), np.asarray(d)) for g, (a, d) in info.get("curves", {}).items()}


def export_smaller(cfg: Config, stage: ChannelStage, model: nn.Module, out: RunLayout) -> dict:
    """The physically smaller model (torch.export and ONNX) and its latency beside the dense model's."""
    removal = {g: stage.space.removed(g) for g in stage.space.groups}
    dense = copy.deepcopy(model).cpu().eval()
    example = stage.latency_example[:1].cpu()
    smaller = remove_channels(dense, example, stage.space.removed_indices(removal))
    paths = save_exported(smaller, example, out.final_export)
    dense_s, pruned_s = measure_latency([dense.to(stage.device), smaller.to(stage.device)], stage.latency_example,
                                        repeats=cfg.latency.repeats, threads=cfg.latency.threads, device=stage.device)
    params = (sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in smaller.parameters()))
    log.info("physically smaller model: %s and %s; %d -> %d parameters; latency at batch %d on %s: dense %.3f ms, "
             "pruned %.3f ms (%.2fx)", paths["torch_export"], paths["onnx"], params[0], params[1], len(stage.latency_example),
             stage.device, 1e3 * dense_s, 1e3 * pruned_s, dense_s / pruned_s)
    return {"dense_ms": 1e3 * dense_s, "pruned_ms": 1e3 * pruned_s, "speedup": dense_s / pruned_s,
            "parameters_dense": params[0], "parameters_pruned": params[1]}
