"""The iterative prune / fine-tune loop: composes the pruning core, the collectives and the engines.

Iteration 0 evaluates the dense model. Iteration t prunes to the t-th target of the schedule
(curves sharded across ranks, allocation on rank 0, masks broadcast and checked), fine-tunes with
pruned weights held at zero, evaluates, and rank 0 records the iteration atomically. A rerun of the
same command continues after the last recorded iteration and reuses cached curves; with
``finetune.checkpoint_every`` it also continues an interrupted fine-tuning from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rdprune import distributed, stop
from rdprune.config import Config, TrainingConfig, config_hash, config_to_dict, load_config, save_config
from rdprune.config.schema import section_defaults
from rdprune.core.batchnorm import batchnorm_layers, recalibrate_batchnorm
from rdprune.core.distortion import Distortion
from rdprune.core.grid import Curve
from rdprune.core.layers import describe_layers, evaluation, layer_flops, prunable_layers
from rdprune.core.masks import (
    Masks,
    current_masks,
    enforce_masks,
    flops_remaining,
    layer_sparsity,
    pruned_state_dict,
    save_masks,
    total_sparsity,
)
from rdprune.data import DataBundle, build_data
from rdprune.distributed import DistInfo
from rdprune.errors import UserError, one_line
from rdprune.files import atomic_torch_save, atomic_write, read_error, remove_leftovers, write_json
from rdprune.granularity.base import GranularityStage, StageInputs, stage_class
from rdprune.granularity.spec import spec_of
from rdprune.models.registry import build_model, model_preprocessing
from rdprune.pipeline import feeding
from rdprune.pipeline.plots import plot_accuracy, plot_curves, plot_layer_sparsity
from rdprune.pipeline.run_dir import RunLayout, RunLock, append_result, archive_previous, provenance, read_results
from rdprune.training import checkpoint
from rdprune.training.engine import Engine, train_steps
from rdprune.training.evaluation import evaluate
from rdprune.training.local_engine import LocalEngine
from rdprune.training.optim import make_optimizer, make_scheduler

log = logging.getLogger(__name__)

RESUME_SECTIONS = ("model", "data", "calibration", "prune", "finetune", "pretrain", "latency", "distributed")
"""Config sections that must match for a rerun to continue an earlier run's directory."""
_NO_DEFAULT = object()
RESUME_FREE = {"finetune": ("checkpoint_every",), "calibration": ("curve_cache",)}
"""Keys of those sections that do not change results: a rerun may change them."""
RESUME_ONLY = {"distributed": ("precision",)}
"""Sections of which only these keys count: the training precision changes results, the engine,
timeouts and threads do not (a run may resume under DeepSpeed what DDP started)."""
LATENCY_BUDGET_ONLY = {"latency": ("fit_to_measurement", "grid")}
"""Keys that change results only under prune.budget latency (elsewhere a rerun may change them)."""


@dataclass
class Context:
    """What every stage of the loop needs: config, ranks, data, the model and its prunable layers."""

    cfg: Config
    dist: DistInfo
    out: RunLayout
    data: DataBundle
    model: nn.Module
    stage: GranularityStage  # the granularity's units, costs and choices; its layers carry the masks
    recalibration_skip: str | None = None  # why BatchNorm statistics are not re-estimated, if they are not
    recalibration_images: torch.Tensor | None = None  # loaded at the first recalibration

    @property
    def layers(self) -> dict[str, nn.Module]:
        """The layers that carry masks, in execution order."""
        return self.stage.layers

    @property
    def show(self) -> bool:
        return self.cfg.run.progress and self.dist.is_main


def run(cfg: Config, dist: DistInfo) -> list[dict]:
    """Run (or resume) the whole experiment; returns the rows of ``results.jsonl``."""
    out = RunLayout(cfg.out_path)
    out.check()
    checked = _checked(cfg, dist, out)  # data, model and config checks fail before anything is written
    existed = out.root.exists()
    try:
        return _run_locked(cfg, dist, out, checked)
    except UserError:
        if dist.is_main and not existed:
            _discard_untouched(out)  # refused while building the stage: leave no folder holding only the lock
        raise


def _discard_untouched(out: RunLayout) -> None:
    """Remove a run directory this run created that holds nothing but its lock file."""
    if out.root.is_dir() and {p.name for p in out.root.iterdir()} <= {out.lock.name}:
        out.lock.unlink(missing_ok=True)
        out.root.rmdir()


def _run_locked(cfg: Config, dist: DistInfo, out: RunLayout, checked: _Checked) -> list[dict]:
    """The run once its cheap checks passed: the lock, the stage (latency tables), then every iteration."""
    with ExitStack() as held:
        # The lock before the stage: a busy directory is refused before a latency table is timed for it.
        finished = distributed.broadcast_object(_lock_or_report(cfg, out, held) if dist.is_main else None)
        if finished is not None:
            return finished
        ctx = _with_stage(checked)
        if dist.is_main:
            _prepare_out_dir(cfg, out, dist)
            ctx.stage.save_state(out)
        distributed.barrier()
        if cfg.calibration.bn_recalibration and ctx.recalibration_skip is not None:
            log.info("BatchNorm statistics are not re-estimated after pruning: %s", ctx.recalibration_skip)
        rows = _resume_or_start(ctx)
        for t, target in enumerate(cfg.prune.schedule(), 1):
            if t < len(rows):
                continue
            stop.check(f"before iteration {t}, after iteration {t - 1} was recorded")  # a safe point (SIGTERM, SIGINT)
            rows.append(_iteration(ctx, t, target))
        stop.check("before the final model was written")
        if dist.is_main:
            _finish(ctx, rows)
        distributed.barrier()
    return rows


def _lock_or_report(cfg: Config, out: RunLayout, held: ExitStack) -> list[dict] | None:
    """Take the run's lock into ``held`` (rank 0) and return None; or, where the directory cannot be
    written (read-only, no permission) and holds this config's finished run, its rows: the run is
    reported as it is, nothing runs and nothing is written. Otherwise the write error's one line."""
    try:
        held.enter_context(RunLock(out.root))
        return None
    except UserError as err:
        cause = err.__cause__
        if not (isinstance(cause, OSError) and cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM)):
            raise
        rows = _finished_rows(cfg, out)
        if rows is None:
            raise
        log.info("%s holds this config's finished run and cannot be written (%s): reporting it as it is",
                 out.root, os.strerror(cause.errno))
        return rows


def _finished_rows(cfg: Config, out: RunLayout) -> list[dict] | None:
    """The rows of the finished run of this config in ``out``, read without writing; None if it is not one."""
    if not cfg.run.resume or not (out.final_model.is_file() and out.final_masks.is_file()):
        return None
    rows = read_results(out.root)
    stored = _stored_key(out)
    if len(rows) != len(cfg.prune.schedule()) + 1 or not isinstance(stored, dict) or not same_run(stored, cfg):
        return None
    return rows


def _prepare_out_dir(cfg: Config, out: RunLayout, dist: DistInfo) -> None:
    """Remove temporary files a killed run left, archive or check an earlier run, then write the
    resolved config and provenance."""
    for leftover in remove_leftovers(out.root):  # under the run lock: no other process writes here now
        log.info("removed %s, left by an interrupted write", leftover)
    if not cfg.run.resume:
        moved = archive_previous(out.root)
        if moved:
            log.info("run.resume=false: moved the earlier run to %s", moved)
    elif read_results(out.root):
        stored = _stored_key(out)
        if not isinstance(stored, dict):
            what = "is missing, and so is config.yaml" if isinstance(stored, FileNotFoundError) else \
                "is not the JSON object that names this run's config"
            raise UserError(
                f"{out.resume_key} {what}; without it a rerun cannot tell "
                "whether it continues the same experiment: restore it, or set run.resume=false to archive the run "
                "and start clean"
            )
        differences = run_differences(stored, cfg)
        if differences:
            raise UserError(
                f"{out.root} holds a run of a different config (it ran with {', '.join(differences[:4])}"
                f"{' ...' if len(differences) > 4 else ''}); rerun with those settings to resume it, set run.resume=false "
                "to archive it and start clean, or choose another run.out_dir"
            )
    save_config(cfg, out.config)
    write_json(out.resume_key, resume_key(cfg))
    write_json(out.provenance, provenance(config_hash(cfg), dist.world_size))


def _as_override(value: object) -> str:
    """A stored value as a command-line override writes it."""
    if value is _NO_DEFAULT:
        return "(none)"
    return value if isinstance(value, str) else json.dumps(value)


def _stored_key(out: RunLayout) -> object:
    """The resume key of the run in ``out``: ``resume_key.json``, else the one of its ``config.yaml`` (a lost
    key file); an error where neither can be read."""
    path = out.resume_key if out.resume_key.exists() or not out.config.exists() else out.config
    try:
        if path == out.config:
            log.warning("%s is missing: checking this config against %s instead", out.resume_key, out.config)
            return resume_key(load_config(out.config, []))
        return json.loads(path.read_text())
    except OSError as err:
        if (user := read_error(path, err)) is not None:
            raise user from None
        return err
    except (UnicodeDecodeError, ValueError) as err:  # a ConfigError is a ValueError too
        return err


def resume_key(cfg: Config) -> dict:
    """What a run directory's config must share with a rerun's for the rerun to continue it.

    The latency section counts only for granularities that read it.
    """
    resolved = config_to_dict(cfg)
    sections = [s for s in RESUME_SECTIONS if s != "latency" or spec_of(cfg.prune.granularity).reads_latency]
    free = {s: RESUME_FREE.get(s, ()) + (LATENCY_BUDGET_ONLY.get(s, ()) if cfg.prune.budget != "latency" else ())
            for s in sections}
    return {s: {k: v for k, v in resolved[s].items()
                if k not in free.get(s, ()) and (s not in RESUME_ONLY or k in RESUME_ONLY[s])} for s in sections}


KEYS_BEFORE_THEY_EXISTED = {"prune": {"ranking": "l2"}, "latency": {"grid": "even"}}
"""What a run made before a key existed ran with: a stored resume key that lacks the key compares with
this, not with the key's current default, so a changed default never switches a resumed run."""


def same_run(stored: dict, cfg: Config) -> bool:
    """Whether a run directory's stored resume key is this config's (see :func:`run_differences`)."""
    return not run_differences(stored, cfg)


def run_differences(stored: dict, cfg: Config) -> list[str]:
    """The settings in which a run directory's stored resume key differs from this config's, as the overrides
    (``section.key=value``) the stored run had.

    A key the stored one lacks (written before that key existed) counts with the value runs had then
    (:data:`KEYS_BEFORE_THEY_EXISTED`, else the key's default), so run directories of earlier versions
    stay resumable and are never switched to a new default.
    """
    current = resume_key(cfg)
    differences = [f"{s} (a section this run does not use)" for s in sorted(set(stored) - set(current))]
    for section, values in current.items():
        old = stored.get(section, {})
        differences += [f"{section}.{k} (unknown to this version)" for k in sorted(set(old) - set(values))]
        defaults = {**section_defaults(section), **KEYS_BEFORE_THEY_EXISTED.get(section, {})}
        for key, value in values.items():
            before = old[key] if key in old else defaults.get(key, _NO_DEFAULT)
            if before != value:
                differences.append(f"{section}.{key}={_as_override(before)}")
    return differences


def check_run(cfg: Config, dist: DistInfo, data: DataBundle | None = None) -> DataBundle:
    """Refuse now what ``run(cfg)`` would refuse about its model, data and pruning (an unreachable
    target, no prunable or 2:4 layer, too few images to recalibrate, a collective timeout shorter
    than the latency table's build), without weights, timing or writing anything: a sweep checks
    every run so before its shared pretraining.

    The model is built with random weights (the checkpoint may not exist yet). Under a latency
    budget the rest is checked under a weights budget with no target: the latency a target needs
    is known only once the layers are timed. Returns the data it built, for the next call with the
    same data to reuse (``data``).
    """
    stage_class(cfg).precheck(cfg, dist)
    data = data if data is not None else _data(cfg)
    prune = cfg.prune
    if prune.budget == "latency":
        prune = dataclasses.replace(prune, budget="weights", target_sparsity=0.0)
    probe = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=None, weights=None), prune=prune)
    quiet = logging.getLogger("rdprune")
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))  # the run itself logs what it finds
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):  # _build seeds torch: leave the caller's generators as they were
            _build(probe, dist, RunLayout(cfg.out_path), data)
    finally:
        quiet.setLevel(level)
    return data


def _data(cfg: Config) -> DataBundle:
    """The run's datasets, shaped by its model's preprocessing."""
    return build_data(cfg.data.name, cfg.data.root, seed=cfg.run.seed,
                      preprocessing=model_preprocessing(cfg.model.name, cfg.model.kwargs, weights=cfg.model.weights))


def _build(cfg: Config, dist: DistInfo, out: RunLayout, data: DataBundle | None = None) -> Context:
    return _with_stage(_checked(cfg, dist, out, data))


@dataclass
class _Checked:
    """What :func:`_checked` built and checked: all but the granularity's stage."""

    setup: StageInputs
    data: DataBundle
    recalibration_skip: str | None


def _checked(cfg: Config, dist: DistInfo, out: RunLayout, data: DataBundle | None = None) -> _Checked:
    """Data, the dense model and its prunable layers, with every check that needs no timing and writes
    nothing (the granularity's precheck, BatchNorm recalibration images included); :func:`_with_stage`
    then builds the stage, which may time a latency table."""
    torch.manual_seed(cfg.run.seed)
    data = data if data is not None else _data(cfg)
    if cfg.model.num_classes is not None and cfg.model.num_classes < data.num_classes:
        raise UserError(f"model.num_classes is {cfg.model.num_classes}, but data {cfg.data.name} has {data.num_classes} "
                        f"classes (labels up to {data.num_classes - 1}); set model.num_classes to at least "
                        f"{data.num_classes}, or null to take it from the data")
    model = _dense_model(cfg, data).to(dist.device)
    infos = describe_layers(model, data.input_shape, skip=cfg.prune.skip)
    everything = prunable_layers(model)
    skipped = {n: m for n, m in everything.items() if n in set(cfg.prune.skip)}
    skipped_flops = layer_flops(model, skipped, data.input_shape, uncalled_ok=True) if skipped else {}
    setup = StageInputs(
        cfg=cfg, dist=dist, out=out, model=model, input_shape=data.input_shape,
        layers={i.name: everything[i.name] for i in infos}, flops={i.name: i.flops for i in infos},
        skipped_weights=sum(m.weight.numel() for m in skipped.values()), skipped_flops=sum(skipped_flops.values()),
    )
    stage_class(cfg).precheck(cfg, dist)
    skip = _recalibration_skip(cfg, model)
    _check_recalibration(cfg, data, skip)
    return _Checked(setup, data, skip)


def _with_stage(checked: _Checked) -> Context:
    """The run's context: :func:`_checked`'s, with the granularity's stage built (a latency table timed or reloaded)."""
    setup = checked.setup
    return Context(cfg=setup.cfg, dist=setup.dist, out=setup.out, data=checked.data, model=setup.model,
                   stage=stage_class(setup.cfg).build(setup), recalibration_skip=checked.recalibration_skip)


def _dense_model(cfg: Config, data: DataBundle) -> nn.Module:
    """The model as the config names it, before any pruning: pretrained, from a checkpoint, or freshly initialised."""
    return build_model(
        cfg.model.name, cfg.model.num_classes or data.num_classes, checkpoint=cfg.model.checkpoint, weights=cfg.model.weights,
        input_shape=data.input_shape, kwargs=cfg.model.kwargs, drop_path_rate=cfg.model.drop_path_rate,
    )


def _recalibration_skip(cfg: Config, model: nn.Module) -> str | None:
    """Why BatchNorm statistics will not be re-estimated after pruning, or None when they will be."""
    if not cfg.calibration.bn_recalibration:
        return "calibration.bn_recalibration is false"
    if not batchnorm_layers(model):
        return "the model has no BatchNorm layer"
    if cfg.calibration.source == "synthetic":
        return "zero-data pruning (calibration.source synthetic)"
    return None


def _check_recalibration(cfg: Config, data: DataBundle, skip: str | None) -> None:
    """Enough training images for BatchNorm recalibration, checked before any work."""
    cal = cfg.calibration
    if skip is not None:
        return
    available = len(data.calibration_pool)
    if cal.bn_images > available:
        raise UserError(f"calibration.bn_images is {cal.bn_images}, but the training set has {available} images; "
                        f"choose at most {available}, or set calibration.bn_recalibration: false")


def _resume_or_start(ctx: Context) -> list[dict]:
    """Load the last completed iteration's weights, or pretrain/evaluate the dense model (iteration 0).

    A resume continues only from a state it can trust, else stops with a one-line UserError:

    * ``checkpoints/last.pt`` must hold the iteration of the last row of ``results.jsonl``. One
      iteration ahead means the run was killed between saving the model and recording its row.
      That row is not recovered: its top-1 right after pruning and its measured distortion were
      taken on the previous iteration's model, which ``last.pt`` no longer holds, so a rebuilt row
      would not be the one the run would have written. After iteration 0 alone the stale
      ``last.pt`` is ignored: the dense model is there, and the first iteration is redone from it.
    * a config that pretrains (no ``model.checkpoint`` or ``model.weights``) needs
      ``pretrained.pt`` to continue after iteration 0 (or to rewind to it): pretraining again need
      not give the same weights (another device, thread count or world size), and a freshly
      initialised network must never stand in for the dense model.
    * an unreadable checkpoint (truncated, or of another model) is named, not a traceback.
    """
    rows = distributed.broadcast_object(read_results(ctx.out.root) if ctx.dist.is_main else None)
    if rows:
        cfg, out = ctx.cfg, ctx.out
        last = rows[-1]["iteration"]
        pretrains = cfg.model.checkpoint is None and cfg.model.weights is None
        unfinished = last < len(cfg.prune.schedule())
        if pretrains and not out.pretrained.exists() and (last == 0 or (cfg.finetune.rewind and unfinished)):
            raise UserError(
                f"{out.pretrained} is missing, but {out.results} records iteration {last} of a run that pretrained "
                f"its dense model (no model.checkpoint or model.weights){' and rewinds to it (finetune.rewind)' if last else ''}; "
                "pretraining again need not reproduce those weights: restore the file, or set run.resume=false to "
                "archive this run and start clean"
            )
        path = out.pretrained if last == 0 else out.last_checkpoint
        if path.exists():
            state = checkpoint.load_run_state(path, ctx.dist.device)
            held = state.get("iteration")
            if last > 0 and held != last:
                lost = f"the run was stopped after saving iteration {held}'s model and before recording its row, " \
                       "which cannot be rebuilt exactly (its top-1 right after pruning was measured on the model before)"
                raise UserError(f"{path} holds iteration {held} but {out.results} ends at iteration {last}: "
                                f"{lost if held == last + 1 else 'the two are not of one run state'}; "
                                "set run.resume=false to archive this run and start clean")
            try:
                ctx.model.load_state_dict(state["model"])
            except RuntimeError as err:
                raise UserError(f"{path} does not fit model {cfg.model.name} ({one_line(err)}); "
                                "set run.resume=false to archive this run and start clean") from None
            if ctx.dist.is_main:
                _check_allocations(ctx, last)
        elif last > 0:  # at 0 the dense model is the config's own (model.checkpoint or model.weights)
            raise UserError(f"{out.root} records iteration {last} but {path} is missing; set run.resume=false to start clean")
        log.info("resuming %s after iteration %d", out.root, last)
        return rows
    start = time.perf_counter()
    if ctx.cfg.model.checkpoint is None and ctx.cfg.model.weights is None:
        _pretrain(ctx)
    top1, loss = _evaluate(ctx)
    row = _row(ctx, 0, 0.0, top1, top1, loss, time.perf_counter() - start)
    if ctx.dist.is_main:
        append_result(ctx.out.root, row)
    log.info("dense model: top-1 %.2f %%, loss %.4f", top1, loss)
    return [row]


def _check_allocations(ctx: Context, last: int) -> None:
    """Every recorded iteration's allocation file is there and readable (rank 0, the model holding iteration
    ``last``). The last one, lost or damaged, is rebuilt from the model's zeros (``last.pt`` holds the masked
    weights), where the granularity records nothing more; an earlier one cannot be: that is one line."""
    schedule = ctx.cfg.prune.schedule()
    for t in range(1, last + 1):
        path = ctx.out.allocation(t)
        try:
            record = json.loads(path.read_text())
            problem = None if isinstance(record, dict) and isinstance(record.get("amounts"), dict) else \
                "not an allocation record"
        except FileNotFoundError:
            problem = "missing"
        except OSError as err:
            if (user := read_error(path, err)) is not None:
                raise user from None
            problem = f"not readable ({one_line(err)})"
        except (UnicodeDecodeError, ValueError):
            problem = "not readable JSON"
        if problem is None:
            continue
        if t == last and type(ctx.stage).allocation_record is GranularityStage.allocation_record:
            write_json(path, {"target_sparsity": schedule[t - 1], "amounts": layer_sparsity(ctx.layers)})
            log.warning("%s was %s: rebuilt from the model of iteration %d in %s", path, problem, t, ctx.out.last_checkpoint)
            continue
        kept = "" if t == last else " (the run keeps only the last iteration's model)"
        raise UserError(f"{path} is {problem}; it records iteration {t}'s per-layer choice, which this run cannot "
                        f"derive again{kept}: restore it, or set run.resume=false to archive this run and start clean")


def _pretrain(ctx: Context) -> None:
    """Train the dense model from scratch when no checkpoint or weights are given (saved for resume)."""
    steps = ctx.cfg.pretrain.steps
    if steps == 0:
        raise UserError("no model.checkpoint or model.weights given and pretrain.steps is 0: give a checkpoint or pretraining steps")
    log.info("pretraining %s for %d steps", ctx.cfg.model.name, steps)
    _train(ctx, ctx.cfg.pretrain, steps, seed=ctx.cfg.run.seed, desc="pretrain")
    if ctx.dist.is_main:
        atomic_torch_save({"model": ctx.model.state_dict()}, ctx.out.pretrained)


def _train(ctx: Context, section: TrainingConfig, steps: int, *, seed: int, desc: str, masks: Masks | None = None,
           iteration: int | None = None) -> float:
    """Train ``steps`` steps with the configured engine; masks, when given, hold pruned weights at zero.

    ``iteration`` (fine-tuning) continues from that iteration's mid-fine-tuning checkpoint, if
    there is one, and writes one every ``finetune.checkpoint_every`` steps.
    """
    if steps == 0:
        return float("nan")
    cfg, dist = ctx.cfg, ctx.dist
    batches = feeding.train_batches(cfg, ctx.data, dist, seed)
    torch.manual_seed(seed)
    optimizer = make_optimizer(ctx.model, section)
    scheduler = make_scheduler(optimizer, section, steps)
    guarded = {"layers": ctx.layers, "masks": masks} if masks is not None else {}
    engine: Engine
    if cfg.distributed.engine == "deepspeed":
        from rdprune.training.deepspeed_engine import DeepSpeedEngine

        engine = DeepSpeedEngine(
            ctx.model, optimizer, dist, zero_stage=cfg.distributed.zero_stage, precision=cfg.distributed.precision,
            global_batch=cfg.data.batch_size, scheduler=scheduler, label_smoothing=section.label_smoothing, **guarded,
        )
    else:
        engine = LocalEngine(ctx.model, optimizer, scheduler, dist, label_smoothing=section.label_smoothing,
                             precision=cfg.distributed.precision, **guarded)
    checkpoints = ctx.out.checkpoints
    try:
        start = 0 if iteration is None else checkpoint.resume_step(checkpoints, iteration, cfg.distributed.engine, dist)
        if start:
            for _ in range(start):  # the same batches as before the interruption; this also replays augmentation
                next(batches)
            engine.load(checkpoints)  # after the replay: the saved random state is the one to continue with
            log.info("iteration %d: resumed fine-tuning at step %d of %d", iteration, start, steps)
        every = cfg.finetune.checkpoint_every if iteration is not None else 0
        # pretraining (no iteration) has no checkpoint: a stop there redoes it
        save = None if iteration is None else lambda step: engine.save(checkpoints, iteration, step)
        loss = train_steps(engine, batches, steps, start=start, every=every, desc=desc, progress=ctx.show, checkpoint=save)
    finally:
        engine.close()
    # DDP sends rank 0's buffers before each forward, so the last forward leaves every rank its own
    # BatchNorm statistics: make rank 0's win, or the ranks' models differ from here on.
    distributed.broadcast_tensors_(list(ctx.model.buffers()))
    return loss


def _evaluate(ctx: Context) -> tuple[float, float]:
    return evaluate(ctx.model, feeding.eval_batches(ctx.cfg, ctx.data, ctx.dist), ctx.dist, progress=ctx.show)


def _row(ctx: Context, t: int, target: float, top1_pruned: float, top1: float, loss: float, seconds: float,
         extras: dict | None = None) -> dict:
    stage = ctx.stage
    sparsity = layer_sparsity(stage.layers)
    sizes = {n: m.weight.numel() for n, m in stage.layers.items()}
    return {
        "iteration": t,
        "method": ctx.cfg.prune.method,
        "target_sparsity": round(target, 10),
        "sparsity": total_sparsity(sizes, sparsity, dense=stage.dense_weights),
        "flops_remaining": flops_remaining(stage.flops, sparsity, dense=stage.dense_flops),
        "top1_pruned": top1_pruned,
        "top1": top1,
        "loss": loss,
        "seconds": round(seconds, 3),
        **(extras or {}),
    }


def _iteration(ctx: Context, t: int, target: float) -> dict:
    """Prune to ``target``, fine-tune, evaluate, record."""
    cfg, dist = ctx.cfg, ctx.dist
    start = time.perf_counter()
    seed = cfg.run.seed * 1000 + t
    torch.manual_seed(seed)
    stage = ctx.stage
    needs_data = cfg.prune.method == "rd" or stage.needs_inputs
    inputs = feeding.calibration(cfg, ctx.data).to(dist.device) if needs_data else None
    labels = feeding.calibration_labels(cfg, ctx.data).to(dist.device) if stage.needs_labels else None
    reference = _outputs(ctx, inputs) if cfg.prune.method == "rd" else None
    with _curve_threads(cfg):
        choice = stage.choose(ctx.model, t, target, inputs, progress=ctx.show, labels=labels)
    masks, extras = choice.masks, dict(choice.info)
    if choice.curves and dist.is_main:
        _save_curves(ctx, t, choice.curves)
    distributed.check_identical({n: m.cpu() for n, m in masks.items()}, f"masks of iteration {t}")
    # Additivity: the allocation's predicted distortion against all units pruned together, where the curves
    # measured the network this stale-statistics pass runs.
    if reference is not None and stage.distortion_comparable:
        extras["distortion_measured"] = _distortion(cfg, reference, _outputs(ctx, inputs))
    _recalibrate(ctx)
    top1_pruned, _ = _evaluate(ctx)
    if cfg.finetune.rewind:
        _rewind(ctx, masks)
        _recalibrate(ctx)
    train_loss = _train(ctx, cfg.finetune, cfg.finetune.steps, seed=seed, desc=f"finetune {t}", masks=masks, iteration=t)
    enforce_masks(ctx.layers, masks)
    top1, loss = _evaluate(ctx)
    row = _row(ctx, t, target, top1_pruned, top1, loss, time.perf_counter() - start, extras)
    if dist.is_main:
        write_json(ctx.out.allocation(t), {"target_sparsity": target, "amounts": layer_sparsity(ctx.layers),
                                           **ctx.stage.allocation_record()})
        atomic_torch_save({"model": ctx.model.state_dict(), "masks": masks, "iteration": t}, ctx.out.last_checkpoint)
        append_result(ctx.out.root, row)
        checkpoint.remove(ctx.out.checkpoints)  # only now: until recorded, it is the way back in
        ctx.out.chosen(t).unlink(missing_ok=True)
    distributed.barrier()
    log.info(
        "iteration %d: sparsity %.2f %% of the weights (target: %.2f %% of the %s), top-1 %.2f %% after pruning, "
        "%.2f %% after fine-tuning (train loss %.4f)",
        t, 100 * row["sparsity"], 100 * target,
        ctx.stage.spec.budget_word(cfg.prune.budget), top1_pruned, top1, train_loss,
    )
    return row


def _outputs(ctx: Context, inputs: torch.Tensor) -> torch.Tensor:
    """The network's outputs on the calibration inputs, measured as the curves measure them."""
    with evaluation(ctx.model), ctx.stage.measurement(ctx.model):
        return torch.cat([ctx.model(b) for b in inputs.split(ctx.cfg.calibration.batch_size)])


def _distortion(cfg: Config, reference: torch.Tensor, out: torch.Tensor) -> float:
    """The curves' distortion measure (mse or worst case) of the whole pruned network on the calibration inputs."""
    return Distortion.named(cfg.prune.distortion).measured(reference, out)


@contextmanager
def _curve_threads(cfg: Config) -> Iterator[None]:
    """``distributed.curve_threads`` while curves are estimated: sharded pieces equal one process's only at fixed threads."""
    threads = torch.get_num_threads()
    if cfg.distributed.curve_threads:
        torch.set_num_threads(cfg.distributed.curve_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _save_curves(ctx: Context, t: int, curves: dict[str, Curve]) -> None:
    """All curves of iteration t (one per unit) in one ``.npz``."""
    arrays = {**{f"{n}/amounts": c.amounts for n, c in curves.items()},
              **{f"{n}/distortion": c.distortion for n, c in curves.items()}}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a bare name
            np.savez(f, **arrays)

    atomic_write(ctx.out.curves(t), write)


def _recalibrate(ctx: Context) -> None:
    """Re-estimate BatchNorm statistics of the pruned model on the same images on every rank."""
    if ctx.recalibration_skip is not None:
        return
    if ctx.recalibration_images is None:
        ctx.recalibration_images = feeding.recalibration(ctx.cfg, ctx.data).to(ctx.dist.device)
    recalibrate_batchnorm(ctx.model, ctx.recalibration_images, batch_size=ctx.cfg.calibration.batch_size)
    # Same weights and images give the same statistics; GPU kernels need not be bitwise deterministic.
    distributed.broadcast_tensors_(list(ctx.model.buffers()))


def _rewind(ctx: Context, masks: dict[str, torch.Tensor]) -> None:
    """Weight rewinding: reset surviving weights to the dense model's before fine-tuning."""
    source = ctx.out.pretrained
    if source.exists():
        dense = torch.load(source, map_location=ctx.dist.device, weights_only=True)["model"]
    else:
        dense = _dense_model(ctx.cfg, ctx.data).state_dict()
    ctx.model.load_state_dict(dense)
    enforce_masks(ctx.layers, masks)


def _finish(ctx: Context, rows: list[dict]) -> None:
    """Final plain state_dict and masks, and the plots."""
    masks = current_masks(ctx.layers)
    atomic_torch_save(pruned_state_dict(ctx.model, masks), ctx.out.final_model)
    save_masks(masks, ctx.out.final_masks)
    order = list(ctx.layers)
    name = f"{ctx.cfg.model.name} / {ctx.cfg.data.name} / {ctx.cfg.prune.method}"
    allocations = [json.loads(p.read_text())["amounts"] for p in ctx.out.allocations()]
    if allocations:
        plot_layer_sparsity(allocations, order, ctx.out.plot("layer_sparsity"), f"per-layer sparsity: {name}")
    plot_accuracy(
        {
            "after fine-tuning": [(r["sparsity"], r["top1"]) for r in rows],
            "right after pruning": [(r["sparsity"], r["top1_pruned"]) for r in rows],
        },
        ctx.out.plot("accuracy"),
        f"top-1 against sparsity: {name}",
    )
    last_curves = ctx.out.all_curves()
    if last_curves:
        units = ctx.stage.units()
        try:
            with np.load(last_curves[-1]) as z:
                curves = {n: Curve(z[f"{n}/amounts"], z[f"{n}/distortion"]) for n in units if f"{n}/amounts" in z}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
            raise UserError(f"{last_curves[-1]} is not readable ({one_line(err)}); delete it to plot the curves of the "
                            "iteration before, or set run.resume=false to archive this run and start clean") from None
        plot_curves(curves, units, ctx.out.plot("rd_curves"), f"RD curves, {last_curves[-1].parent.name}: {name}",
                    unit=ctx.stage.spec.unit)
    ctx.stage.finish(ctx.model, ctx.out, ctx.dist.device)  # last: a failed export must not keep the run from counting
