"""Channel granularity in the run loop: groups, costs, the latency model, the removal per iteration, the export.

The loop is the one of every granularity (:mod:`rdprune.granularity.base`): an iteration turns a
target into masks, applies them, recalibrates, fine-tunes. Here a target becomes a removal
``{group: channels}`` (RD on channel curves sharded over ranks, or a baseline; chosen on rank 0 and
broadcast), checked against the **measured** latency when the budget is latency, and masks from it
on every rank. The end of a run exports the physically smaller model.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rdprune import distributed, registry
from rdprune.config import Config
from rdprune.core.batchnorm import batch_statistics
from rdprune.core.curves import UnitPlan
from rdprune.core.distortion import Distortion
from rdprune.core.grid import Curve, Grid
from rdprune.core.layers import layer_flops
from rdprune.core.masks import enforce_masks
from rdprune.core.runtimes import OnnxRuntime, Runtime, TorchRuntime, runtime_of
from rdprune.core.timing import layer_shapes
from rdprune.distributed import DistInfo
from rdprune.distributed.sharded_curves import sharded_unit_curves, suffix_pieces
from rdprune.distributed.sharding import Piece
from rdprune.errors import UserError
from rdprune.files import write_json
from rdprune.granularity.base import Choice, GranularityStage, StageInputs, chosen_once, save_table, shared_table
from rdprune.granularity.channel import SPEC
from rdprune.granularity.channel.allocation import allocate_channels, meet_measured_latency
from rdprune.granularity.channel.baselines import channel_baseline
from rdprune.granularity.channel.costs import ChannelCost
from rdprune.granularity.channel.curves import estimate_channel_curves, group_plan
from rdprune.granularity.channel.deploy import mark_deploy, summary_line, time_formats
from rdprune.granularity.channel.export import remove_channels, require_onnx, save_exported
from rdprune.granularity.channel.latency import LatencyTable, level_widths
from rdprune.granularity.channel.peers import NEEDS_LABELS as PEER_LABELS
from rdprune.granularity.channel.peers import PEERS, Channels, peer_channels
from rdprune.granularity.channel.ranking import NEEDS_INPUTS, NEEDS_LABELS, rank_channels
from rdprune.granularity.channel.space import ChannelSpace

if TYPE_CHECKING:  # the run layout is the pipeline's: only its paths are used here
    from rdprune.pipeline.run_dir import RunLayout

log = logging.getLogger(__name__)


def counts(channels: Mapping[str, list[int]]) -> dict[str, int]:
    """Channels removed per group, what the costs count."""
    return {g: len(c) for g, c in channels.items()}

WAIT_FACTOR = 2
"""distributed.timeout_s must be this many times latency.time_limit_s under several ranks: the limit
steers the table's build, it does not stop it, and the other ranks wait at a collective meanwhile."""


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




def sharded_channel_curves(
    model: nn.Module,
    space: ChannelSpace,
    inputs: torch.Tensor,
    levels: int,
    *,
    grid: Grid,
    distortion: Distortion,
    batch_size: int,
    flops: Mapping[str, int],
    cache_dir: str | os.PathLike | None,
    dist: DistInfo,
    progress: bool,
    bn_aware: bool = False,
    round_to: int = 1,
) -> dict[str, Curve] | None:
    """Every channel group's curve on rank 0 (``None`` elsewhere); equal to :func:`estimate_channel_curves`.

    Shards are (group, level range) pieces balanced by the FLOPs of the layers from the group's
    first layer on (what one level re-runs) times its levels that remove something new.
    """
    batches = list(inputs.split(batch_size))

    def plan() -> list[list[Piece]]:
        order = list(flops)
        first = {g: min((s.layer for s in group.slices), key=order.index) for g, group in space.groups.items()}
        return suffix_pieces({g: group_plan(space, g, levels, grid, round_to=round_to) for g in space.groups}, first, flops,
                             dist.world_size)

    def estimate(mine: list[Piece]) -> dict[str, Curve]:
        return estimate_channel_curves(
            model, space, batches, levels, grid=grid, worst_case=distortion.worst_case, measure=distortion.measure,
            groups=[p.unit for p in mine],
            level_ranges={p.unit: (p.start, p.stop) for p in mine}, batch_size=batch_size, cache_dir=cache_dir, progress=progress,
            bn_aware=bn_aware, round_to=round_to,
        )

    return sharded_unit_curves(model, batches, dist, plan, estimate, list(space.groups), "channel curve estimation")


def level_plans(cfg: Config, space: ChannelSpace) -> dict[str, UnitPlan]:
    """Every group's levels this iteration, as the curves and RD take them (from what each group has removed now)."""
    return {g: group_plan(space, g, cfg.prune.levels, cfg.prune.grid, round_to=cfg.prune.round_to) for g in space.groups}


@dataclass
class Rounds:
    """RD's curves of an iteration's last round, and the row info of the rounds before it (``prune.curve_rounds``)."""

    curves: dict[str, Curve] | None
    earlier: list[dict]


class ChannelStage(GranularityStage):
    """Groups of coupled channels as units: costs in weights, FLOPs or measured latency; a smaller model at the end."""

    spec = SPEC

    def __init__(self, cfg: Config, dist: DistInfo, out: RunLayout, space: ChannelSpace, cost: ChannelCost,
                 flops: dict[str, int], table: LatencyTable | None, latency_example: torch.Tensor, runtime: Runtime | None = None):
        # Every convolution and linear layer carries masks: the consumers of a removed channel lose their input slice.
        super().__init__(space.layers, flops, dense_weights=0, dense_flops=0)
        self.cfg, self.dist, self.out = cfg, dist, out
        self.space, self.cost, self.table = space, cost, table
        self.latency_example = latency_example  # the batch whose latency counts, on the latency device
        self.example = torch.zeros(1, *latency_example.shape[1:], device=dist.device)  # what a peer pruner traces
        self.runtime = runtime or TorchRuntime(cfg.latency.threads, latency_example.device)  # what that latency is measured in

    @property
    def device(self) -> torch.device:
        return self.latency_example.device

    @classmethod
    def precheck(cls, cfg: Config, dist: DistInfo) -> None:
        check_latency_wait(cfg, dist)
        registry.load(registry.RUNTIMES.get(cfg.latency.runtime)).require()  # an unavailable runtime: one line, before any work

    @classmethod
    def build(cls, setup: StageInputs) -> ChannelStage:
        """Groups and costs; for a latency budget the latency table (rank 0 measures or reloads it, every rank gets it)."""
        cfg, dist, model = setup.cfg, setup.dist, setup.model
        require_onnx()  # the export at the end needs it: say so now, not after the run
        example = torch.zeros(1, *setup.input_shape, device=dist.device)
        try:
            space = ChannelSpace(model, example, skip=cfg.prune.skip, min_density=cfg.prune.min_density)
        except ValueError as exc:
            raise UserError(str(exc).splitlines()[0]) from exc
        flops = layer_flops(model, space.layers, setup.input_shape)
        device = torch.device(cfg.latency.device) if cfg.latency.device else dist.device
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("latency.device is cuda but CUDA is not available on this machine; measure on cpu, or run where "
                            "the deployment GPU is")
        check_round_to(space, cfg.prune.round_to)
        runtime = runtime_of(cfg.latency, device)
        latency_example = torch.randn(cfg.latency.batch_size, *setup.input_shape,
                                      generator=torch.Generator().manual_seed(0)).to(device)
        if runtime.separate_layers:  # a model or layer the runtime cannot run: one line, before any timing
            with torch.no_grad():
                runtime.check_model(copy.deepcopy(model).cpu().eval(), latency_example.cpu(), layer_shapes(model, example))
        table = None
        if cfg.prune.budget == "latency":
            widths = level_widths(space, level_plans(cfg, space)) if cfg.latency.grid == "levels" else None
            table = _latency_table(cfg, model, latency_example, dist, setup.out, runtime, widths)
        cost = ChannelCost(space, cfg.prune.budget, flops=flops, latency=table)
        stage = cls(cfg, dist, setup.out, space, cost, flops, table, latency_example, runtime)
        stage.check_reachable(cfg.prune.target_sparsity)
        return stage

    def check_reachable(self, target: float) -> None:
        """The final target against every group at its floor, before any work."""
        space, n = self.space, self.cfg.prune.round_to
        most = {g: space.max_removed(g) if n <= 1 else
                max(space.removed(g), grp.size - n * -(-grp.min_kept // n)) for g, grp in space.groups.items()}
        reachable = 1.0 - self.cost(most) / self.cost.dense
        if target > reachable:
            rounded = f" (rounded to multiples of {n})" if n > 1 else ""
            raise UserError(f"prune.target_sparsity {target} is out of reach at channel granularity: with every channel group "
                            f"at its floor{rounded} at most {reachable:.6f} of the {self.cost.budget} can go; lower the target or "
                            "prune.min_density")

    def units(self) -> list[str]:
        return list(self.space.groups)

    def save_state(self, out: RunLayout) -> None:
        save_table(out.latency_table, None if self.table is None else self.table.to_json())

    def allocation_record(self) -> dict:
        return {"removal": {g: self.space.removed(g) for g in self.space.groups}}

    @property
    def needs_labels(self) -> bool:
        return self.cfg.prune.ranking in NEEDS_LABELS or self.cfg.prune.method in PEER_LABELS

    @property
    def needs_inputs(self) -> bool:
        return self.needs_labels or self.cfg.prune.ranking in NEEDS_INPUTS

    @property
    def _renormalised(self) -> bool:
        return self.cfg.prune.bn_aware_curves

    def measurement(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return batch_statistics(model) if self._renormalised else contextlib.nullcontext()

    def _rank(self, inputs: torch.Tensor | None, labels: torch.Tensor | None) -> None:
        """Rank the channels for this iteration (rank 0 scores a data-aware ranking, every rank gets the scores)."""
        ranking = self.cfg.prune.ranking
        if ranking not in NEEDS_INPUTS:
            rank_channels(self.space, ranking)
            return
        scores = None
        if self.dist.is_main:
            rank_channels(self.space, ranking, inputs, labels, self.cfg.calibration.batch_size)
            scores = {g: self.space.importance(g) for g in self.space.groups}
        self.space.rank(ranking, distributed.broadcast_object(scores))

    def choose(self, model: nn.Module, iteration: int, target: float, inputs: torch.Tensor | None, *,
               progress: bool, labels: torch.Tensor | None = None) -> Choice:
        """This iteration's removal (the same on every rank) as masks applied to ``model``.

        Channels are ranked first (``prune.ranking``), so curves, RD and the baselines remove the same
        channels first. The choice is kept in the run directory until the iteration is recorded; an
        iteration resumed after an interruption reuses it instead of solving (and timing) again.
        """
        cfg, space, cost = self.cfg, self.space, self.cost
        self._rank(inputs, labels)
        current = {g: space.removed(g) for g in space.groups}

        limit = (1.0 - target) * cost.dense

        def estimate() -> dict[str, Curve] | None:
            return sharded_channel_curves(
                model, space, inputs, cfg.prune.levels, grid=cfg.prune.grid, distortion=Distortion.named(cfg.prune.distortion),
                batch_size=cfg.calibration.batch_size, flops=self.flops,
                cache_dir=cfg.calibration.curve_cache or self.out.curve_cache(iteration), dist=self.dist, progress=progress,
                bn_aware=self._renormalised, round_to=cfg.prune.round_to,
            )

        def rd(curves: dict[str, Curve], limit: float) -> tuple[Channels, dict]:
            alloc = allocate_channels(curves, level_plans(cfg, space), self.cost, limit)
            return space.channels_for(alloc.choice), {"distortion_predicted": alloc.distortion,
                                                       "distortion_lower_bound": alloc.lower_bound,
                                                       "allocation_rounds": alloc.rounds}

        def curves() -> Rounds | None:
            """The curves of the last round, after the earlier rounds' cuts are applied to ``model`` (every rank)."""
            if cfg.prune.method != "rd":
                return None
            rounds, start = cfg.prune.curve_rounds, cost(current)
            earlier: list[dict] = []
            for r in range(1, rounds):
                found, step = estimate(), None
                if self.dist.is_main:
                    step, info = rd(found, start + (limit - start) * r / rounds)
                    earlier.append(info)
                    log.info("curve round %d of %d: %s of the %s left, curves re-measured on that network", r, rounds,
                             f"{cost(counts(step)) / cost.dense:.1%}", cost.budget)
                step = distributed.broadcast_object(step)
                enforce_masks(self.layers, space.channel_masks(step))
            return Rounds(estimate(), earlier)

        def solve(found: Rounds | None) -> tuple[Channels, dict]:
            self._refresh_table(model)
            cost = self.cost

            def allocate(limit: float) -> tuple[Channels, dict]:
                if cfg.prune.method in PEERS:
                    return peer_channels(cfg.prune.method, space, cost, limit, self.example, [space.output_layer, *cfg.prune.skip],
                                         cfg.prune.min_density, inputs, labels, cfg.calibration.batch_size), {}
                if found is None:
                    return space.channels_for(channel_baseline(cfg.prune.method, space, cost, limit, current)), {}
                return rd(found.curves, limit)

            if cfg.prune.budget == "latency":
                chosen, info = self._meet_latency(model, allocate, target)
            else:
                chosen, info = allocate(limit)
            if found is not None and found.earlier:  # the rounds' predictions add up to the iteration's
                for key in ("distortion_predicted", "distortion_lower_bound", "allocation_rounds"):
                    parts = [info.get(key), *(r.get(key) for r in found.earlier)]
                    info[key] = None if None in parts else sum(parts)
            info["cost_remaining"] = cost(counts(chosen)) / cost.dense
            info["channels_removed"] = sum(map(len, chosen.values()))
            return chosen, info

        removal, info, found = chosen_once(self.out.chosen(iteration), target, self.dist, curves, solve)
        if all(isinstance(v, int) for v in removal.values()):  # kept by an earlier version: counts of the ranking's first
            removal = space.channels_for(removal)
        masks = space.channel_masks(removal)
        enforce_masks(self.layers, masks)
        return Choice(masks, info, None if found is None else found.curves)

    def _refresh_table(self, model: nn.Module) -> None:
        """latency.grid levels, rank 0: time the table again when this iteration's levels give channel counts it
        was not timed at (an iteration after the first starts from what the earlier ones removed), so that the
        allocation prices exactly the counts it chooses from; the run directory keeps the newest table. Only rank 0
        solves, so the other ranks keep the first table (it served them only to check the target's reach)."""
        if self.table is None or self.cfg.latency.grid != "levels":
            return
        widths = level_widths(self.space, level_plans(self.cfg, self.space))
        if self.table.covers(widths):
            return
        log.info("latency table: this iteration's levels give channel counts the table was not timed at; timing them")
        data = _build_table(self.cfg, model, self.latency_example, self.runtime, widths)
        self.table = LatencyTable.from_json(data)
        self.cost = ChannelCost(self.space, self.cfg.prune.budget, flops=self.flops, latency=self.table)
        write_json(self.out.latency_table, data)

    def _meet_latency(self, model: nn.Module, allocate: Callable[[float], tuple[Channels, dict]],
                      target: float) -> tuple[Channels, dict]:
        """Solve under the latency model, measure the smaller model, and re-solve tighter while it is over budget."""
        details: dict = {}

        def solve_latency(limit: float) -> Channels:
            removal, extra = allocate(limit)
            details.update(extra)
            return removal

        lat, space = self.cfg.latency, self.space
        reference = None
        if lat.fit_to_measurement:  # a uniform cut near the budget: the second point of the fit
            reference = space.channels_for(channel_baseline("unif", space, self.cost, (1.0 - target) * self.cost.dense))
        checked = meet_measured_latency(
            solve_latency, lambda removal: self._measure(model, removal, lat.repeats, lat.threads),
            lambda removal: self.cost(counts(removal)), self.cost.dense, 1.0 - target, lat.correction_rounds, reference)
        info = {**details, "latency_predicted_ms": 1e3 * checked.predicted_s,
                "latency_predicted_dense_ms": 1e3 * checked.predicted_dense_s, "latency_first_ms": 1e3 * checked.first_s,
                "latency_first_dense_ms": 1e3 * checked.first_dense_s, "latency_model_error": checked.model_error,
                "latency_model_error_absolute": checked.absolute_error, "latency_table_error": checked.table_error,
                "latency_fit_offset_ms": 1e3 * checked.offset_s, "latency_fit_scale": checked.scale,
                "latency_dense_ms": 1e3 * checked.dense_s,
                "latency_ms": 1e3 * checked.pruned_s, "latency_speedup": checked.speedup,
                "latency_corrections": checked.corrections, **self.latency_setting()}
        return checked.removal, info

    def latency_setting(self) -> dict:
        """Where the latency counted was measured: the results row's runtime, batch, threads and device."""
        rt = self.runtime
        return {"latency_runtime": rt.name, "latency_batch": len(self.latency_example), "latency_threads": rt.threads,
                "latency_device": str(rt.device), "latency_optimization": rt.optimization}

    def _measure(self, model: nn.Module, removal: Channels, repeats: int, threads: int | None) -> tuple[float, float]:
        """(dense, pruned) seconds of one forward pass in the run's runtime, the physically smaller copy timed
        interleaved with the dense one (under ONNX Runtime both exported to ONNX first)."""
        dense = copy.deepcopy(model).to(self.device).eval()
        smaller = remove_channels(dense, self.latency_example[:1], self.space.channel_indices(removal))
        dense_s, pruned_s = self.runtime.measure([dense, smaller], self.latency_example, repeats)
        return dense_s, pruned_s

    def finish(self, model: nn.Module, out: RunLayout, device: torch.device) -> None:
        """The physically smaller model (torch.export and ONNX) and its latency beside the dense model's.

        A failed export is logged, not raised: the run has counted as finished already."""
        try:
            speed = self.export_smaller(model, out.smaller_model.parent)
        except (RuntimeError, ValueError) as exc:
            log.error("the physically smaller model was not exported: %s", str(exc).splitlines()[0] if str(exc) else exc)
        else:
            write_json(out.smaller_model.parent / "latency.json", speed)

    def export_smaller(self, model: nn.Module, directory: Path) -> dict:
        """``model.pt2`` and ``model.onnx`` of the smaller model in ``directory``; their latency and parameters against dense.

        Each format's file is timed against the dense model's file of the same format in the runtime that runs it
        (model.pt2: torch; model.onnx: ONNX Runtime, with the run's settings where it is the run's runtime), at batch 1
        and at latency.batch_size; only the formats measured not slower at both are marked ``deploy``
        (:mod:`rdprune.granularity.channel.deploy`). ``dense_ms``, ``pruned_ms`` and ``speedup`` are those of the run's
        runtime at latency.batch_size.
        """
        removal = {g: self.space.removed(g) for g in self.space.groups}
        dense = copy.deepcopy(model).cpu().eval()
        example = self.latency_example[:1].cpu()
        smaller = remove_channels(dense, example, self.space.removed_indices(removal))
        paths = save_exported(smaller, example, directory)
        runtimes = self.format_runtimes()
        batch = len(self.latency_example)
        timings = time_formats(dense, paths, self.latency_example.cpu(), [1, batch], runtimes, self.cfg.latency.repeats)
        marking = mark_deploy(timings, {f: r.name for f, r in runtimes.items()})
        dense_s, pruned_s = timings[self.runtime.file_format][batch]
        params = (sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in smaller.parameters()))
        log.info("physically smaller model: %s and %s; %d -> %d parameters; latency in %s at batch %d: dense %.3f ms, "
                 "pruned %.3f ms (%.2fx)", paths["torch_export"], paths["onnx"], params[0], params[1], self.runtime.describe(),
                 batch, 1e3 * dense_s, 1e3 * pruned_s, dense_s / pruned_s)
        (log.info if not marking["slower"] else log.warning)("exported formats against dense at batch 1 and %d: %s", batch,
                                                              summary_line(marking))
        return {"dense_ms": 1e3 * dense_s, "pruned_ms": 1e3 * pruned_s, "speedup": dense_s / pruned_s,
                "timed": paths[self.runtime.file_format].name, "batch": batch, "device": str(self.runtime.device),
                "parameters_dense": params[0], "parameters_pruned": params[1], **self.latency_setting(), **marking}

    def format_runtimes(self) -> dict[str, Runtime]:
        """The runtime each exported format is timed in: the run's for its own format, the other one's defaults
        (same threads; ONNX Runtime at optimisation level all, on the CPU) for the other."""
        rt = self.runtime
        torch_rt = rt if rt.file_format == "torch_export" else TorchRuntime(rt.threads, "cpu")
        onnx_rt = rt if rt.file_format == "onnx" else OnnxRuntime(rt.threads, "cpu", "all")
        return {"torch_export": torch_rt, "onnx": onnx_rt}


def table_key_problem(meta: Mapping, runtime: Runtime, batch: int) -> str | None:
    """Why a stored table's ``meta`` was not measured as this run measures (runtime, threads, optimisation level,
    batch, device), or None: a table is reused only when every key matches. A table written before runtimes
    existed was measured in torch."""
    wanted = {**runtime.key(), "batch": batch}
    stored = {"runtime": "torch", "optimization": None, **meta}
    differs = [f"{k} {stored.get(k)!r} (this run: {v!r})" for k, v in wanted.items() if stored.get(k) != v]
    return f"measured at {', '.join(differs)}" if differs else None


def check_round_to(space: ChannelSpace, round_to: int) -> None:
    """Refuse a prune.round_to larger than a channel group, in one line, before any work."""
    if round_to > 1:
        small = [(g, grp.size) for g, grp in space.groups.items() if grp.size < round_to]
        if small:
            raise UserError(f"prune.round_to {round_to} is larger than channel group {small[0][0]} ({small[0][1]} channels)"
                            f"{f' and {len(small) - 1} more' if len(small) > 1 else ''}; lower it, or list the group's layer "
                            "in prune.skip")


def _latency_table(cfg: Config, model: nn.Module, example: torch.Tensor, dist: DistInfo, out: RunLayout,
                   runtime: Runtime | None = None, widths: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
                   ) -> LatencyTable:
    """The latency table: built (or reused, if it was measured alike) on rank 0 while the other ranks wait at the broadcast.

    ``widths`` (latency.grid levels): each layer's channel counts to time, else latency.points evenly spaced ones."""
    check_latency_wait(cfg, dist)
    runtime = runtime or runtime_of(cfg.latency, example.device)

    def check(data: dict) -> str | None:
        return table_key_problem(LatencyTable.from_json(data).meta, runtime, len(example))

    return LatencyTable.from_json(shared_table(out.latency_table, resume=cfg.run.resume, dist=dist, check=check,
                                               build=lambda: _build_table(cfg, model, example, runtime, widths),
                                               what="latency table"))


def _build_table(cfg: Config, model: nn.Module, example: torch.Tensor, runtime: Runtime,
                 widths: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None) -> dict:
    """A latency table of ``model`` timed now in ``runtime`` (JSON form), on ``widths`` or latency.points even counts."""
    probe = copy.deepcopy(model).to(example.device).eval()
    log.info("latency table: timing the layers of %s at batch %d in %s (at most %.0f s)",
             cfg.model.name, len(example), runtime.describe(), cfg.latency.time_limit_s)
    return LatencyTable.build(probe, example, layer_shapes(probe, example), points=cfg.latency.points, channel_grid=widths,
                              time_limit_s=cfg.latency.time_limit_s, progress=cfg.run.progress, runtime=runtime).to_json()
