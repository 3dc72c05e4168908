"""Rate-distortion curves: the output distortion when one layer alone is pruned to each grid amount.

For layer l and amount a_k, the ``round(a_k * n_l)`` smallest-magnitude weights of l are zeroed
(zeros count among them), the network runs in eval mode on the calibration inputs X, and the
output is compared with the unpruned output Y:

- ``mse``: mean over samples and outputs of ``(Y - Ŷ)^2``;
- ``worst_case``: max over samples of the per-sample mean of ``(Y - Ŷ)^2``;
- ``measure="kl"``: ``KL(softmax(Y) || softmax(Ŷ))`` over the classes instead of the squared error
  (mean over samples, or with ``worst_case`` the worst sample; :mod:`rdprune.core.distortion`).

BatchNorm-aware curves (``bn_aware=True``) measure the network as it will run after pruning: for
every (layer, level), the BatchNorm statistics are re-estimated exactly on the calibration inputs
(:func:`rdprune.core.batchnorm.recalibrate_batchnorm`), and Y is the unpruned network's output
after the same re-estimation, so the distortion at level 0 is exactly zero. When the calibration
inputs form one batch this costs one renormalisation per BatchNorm layer per suffix pass
(:func:`rdprune.core.batchnorm.batch_statistics`); otherwise the plain definition runs, with a warning.

:func:`estimate_curves` gives the same values as the plain definition (:func:`plain_curves`) but
re-runs only the part of the network downstream of the pruned layer (see :mod:`rdprune.core.suffix`;
for models fx cannot trace, :mod:`rdprune.core.replay`), skips levels that prune nothing new, and
keeps at most one calibration batch of intermediate values alive at a time.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rdprune import stop
from rdprune.core.batchnorm import batch_statistics, batchnorm_layers, recalibrate_batchnorm
from rdprune.core.curve_cache import CurveCache, fingerprint_inputs
from rdprune.core.distortion import Distortion, Measure
from rdprune.core.floor import check_min_density, max_amount
from rdprune.core.grid import Curve, Grid, level_amounts
from rdprune.core.layers import evaluation, prunable_layers
from rdprune.core.masks import magnitude_mask, magnitude_order, pruned_count
from rdprune.core.replay import ModuleReplay
from rdprune.core.suffix import ForwardWalker, SuffixPlan, TracedNetwork, UnsafeSuffix

logger = logging.getLogger(__name__)


def synthetic_inputs(n: int, input_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """``n`` samples of N(0, 1) noise shaped ``input_shape``: calibration for zero-data pruning."""
    if n < 1:
        raise ValueError(f"the number of synthetic inputs must be >= 1, got {n}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *input_shape, generator=generator)


def layer_amounts(module: nn.Module, levels: int, grid: Grid = "relative", min_density: float = 0.0) -> np.ndarray:
    """The distinct absolute amounts evaluated for ``module`` now (what ``level_ranges`` indexes).

    The top level is the layer's floor (:mod:`rdprune.core.floor`: one weight per output unit on
    average, and ``min_density`` of its weights), or its current sparsity if that is higher.
    """
    weight = module.weight
    sparsity = int((weight == 0).sum()) / weight.numel()
    return np.unique(np.clip(level_amounts(levels, grid, sparsity, max_amount(module, min_density)), 0.0, 1.0))


def merge_curve_pieces(pieces: Iterable[Curve]) -> Curve:
    """Join curves of one layer computed on disjoint level ranges into one curve."""
    pieces = list(pieces)
    if not pieces:
        raise ValueError("no curve pieces to merge")
    amounts = np.concatenate([p.amounts for p in pieces])
    distortion = np.concatenate([p.distortion for p in pieces])
    order = np.argsort(amounts, kind="stable")
    amounts, distortion = amounts[order], distortion[order]
    if np.any(np.diff(amounts) <= 0):
        raise ValueError("curve pieces overlap: each amount must come from exactly one piece")
    return Curve(amounts, distortion)


def as_batches(inputs: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batches = list(inputs.split(batch_size)) if isinstance(inputs, torch.Tensor) else list(inputs)
    if not batches or not all(isinstance(b, torch.Tensor) and b.dim() >= 1 and len(b) > 0 for b in batches):
        raise ValueError("calibration inputs must be a non-empty tensor or an iterable of non-empty tensors (one per batch)")
    return batches


def _select_layers(
    model: nn.Module, layers: Iterable[str] | None, skip: Iterable[str]
) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """All prunable layers (as trace leaves) and the requested subset, in declaration order."""
    every = prunable_layers(model, skip)
    if layers is None:
        return every, every
    wanted = list(layers)
    unknown = sorted(set(wanted) - set(every))
    if unknown:
        raise ValueError(f"layers not among the prunable layers: {unknown[:5]}; prunable layers are: {list(every)[:8]} ...")
    if not wanted:
        raise ValueError("the list of layers to estimate curves for is empty")
    return every, {n: m for n, m in every.items() if n in set(wanted)}


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_output(out: object, batch: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"curve estimation needs a model whose output is one tensor, got {type(out).__name__}")
    if out.dim() < 1 or out.shape[0] != batch.shape[0]:
        raise ValueError(f"the model output must have the batch as its first dimension, got shape {tuple(out.shape)} "
                         f"for {batch.shape[0]} samples")
    if not torch.isfinite(out).all():
        raise ValueError(f"the network output contains NaN or inf {what}; curves need finite outputs")
    return out


def _reference_outputs(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [
        _check_output(model(b.to(device)), b, f"on calibration batch {i} (unpruned model)")
        for i, b in enumerate(batches)
    ]


@dataclass(frozen=True)
class UnitPlan:
    """The levels of one layer: amounts (this call's range) and their pruned counts."""

    amounts: np.ndarray
    counts: list[int]
    zeros: int
    level_range: tuple[int, int] | None

    @property
    def to_run(self) -> list[int]:
        """Distinct counts that prune something new: only these need a forward pass."""
        return sorted({c for c in self.counts if c > self.zeros})


def layer_plan(
    name: str, module: nn.Module, levels: int, grid: Grid, level_range: tuple[int, int] | None, min_density: float = 0.0
) -> UnitPlan:
    amounts = layer_amounts(module, levels, grid, min_density)
    if level_range is not None:
        start, stop = level_range
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= len(amounts)):
            raise ValueError(f"level range of layer {name!r} must satisfy 0 <= start < stop <= {len(amounts)}, got {level_range}")
        amounts = amounts[start:stop]
    n = module.weight.numel()
    return UnitPlan(amounts, [pruned_count(float(a), n) for a in amounts], int((module.weight == 0).sum()), level_range)


class _PlainRunner:
    """Runs the whole model for every level: the fallback for models fx cannot trace."""

    def __init__(self, model: nn.Module):
        self.model = model

    def affects_output(self, modules: tuple[nn.Module, ...]) -> bool:
        return True

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def prepare(self, modules: tuple[nn.Module, ...], session: torch.Tensor) -> torch.Tensor:
        return session

    def run(self, modules: tuple[nn.Module, ...], state: torch.Tensor) -> object:
        return self.model(state)


class _ReplayRunner:
    """Runs the whole model for every level, but with the modules that finish before the pruned unit's
    first layer answering from a record of the unpruned pass (:mod:`rdprune.core.replay`): the
    fallback for models fx cannot trace. A unit's first replay is checked against its record."""

    def __init__(self, replay: ModuleReplay):
        self.replay = replay
        self.model = replay.model
        self._names: dict[tuple[nn.Module, ...], list[str]] = {}
        self._checked: set[tuple[nn.Module, ...]] = set()

    def affects_output(self, modules: tuple[nn.Module, ...]) -> bool:
        return True

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def prepare(self, modules: tuple[nn.Module, ...], session: torch.Tensor) -> tuple[torch.Tensor, dict[str, object]]:
        if modules not in self._names:
            self._names[modules] = self.replay.replayable(modules)
        names = self._names[modules]
        if not names:
            return session, {}
        try:
            outputs, unpruned = self.replay.record(session, names, modules)
            if modules not in self._checked:
                again = self.replay.run(session, outputs, modules)
                if not (isinstance(again, torch.Tensor) and again.shape == unpruned.shape
                        and torch.allclose(again, unpruned, rtol=1e-5, atol=1e-6 * float(unpruned.abs().max()))):
                    raise UnsafeSuffix("replaying the modules that run before it does not reproduce the model's output")
                self._checked.add(modules)
        except UnsafeSuffix:
            raise
        except Exception as exc:  # a module the replay disturbs: exact with the plain loop
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            raise UnsafeSuffix(f"replaying the modules that run before it fails ({reason})") from exc
        return session, outputs

    def run(self, modules: tuple[nn.Module, ...], state: tuple[torch.Tensor, dict[str, object]]) -> object:
        x, outputs = state
        return self.replay.run(x, outputs, modules) if outputs else self.model(x)


class _SuffixRunner:
    """Runs only the suffix of the pruned unit's layers, from boundary values of the unpruned forward pass.

    One :class:`~rdprune.core.suffix.ForwardWalker` per batch (:meth:`start`) walks that forward
    pass once and serves every unit's boundary in turn (:meth:`prepare`).
    """

    def __init__(self, network: TracedNetwork):
        self.network = network
        self.model = network.model
        self._plans: dict[tuple[nn.Module, ...], SuffixPlan] = {}

    def _plan(self, modules: tuple[nn.Module, ...]) -> SuffixPlan:
        if modules not in self._plans:  # plans hold references into the graph only
            self._plans[modules] = self.network.plan(*modules)
        return self._plans[modules]

    def affects_output(self, modules: tuple[nn.Module, ...]) -> bool:
        return bool(self._plan(modules).suffix)

    def start(self, x: torch.Tensor) -> ForwardWalker:
        return self.network.walker(x)

    def prepare(self, modules: tuple[nn.Module, ...], session: ForwardWalker) -> dict:
        return self.network.boundary_from(session, self._plan(modules))

    def run(self, modules: tuple[nn.Module, ...], state: dict) -> object:
        return self.network.run_suffix(self._plan(modules), state)


class PruningUnit(Protocol):
    """What gets one choice of level: a layer's weights, or a group of coupled channels.

    ``modules`` are the layers whose weights a level changes (curve estimation re-runs what
    depends on them); :meth:`hold` saves them, :meth:`prune` sets them to one level's pruned
    weights (counts increase between calls), :meth:`restore` puts the saved weights back.
    """

    name: str
    kind: str  # "layer" or "channel group", for messages
    modules: tuple[nn.Module, ...]

    def hold(self) -> None: ...

    def prune(self, count: int) -> None: ...

    def restore(self) -> None: ...


class _LayerUnit:
    """One layer's weights, pruned by magnitude: level ``count`` zeroes its ``count`` smallest weights."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.kind, self.modules = name, "layer", (module,)
        self._weight = module.weight

    def hold(self) -> None:
        self._original = self._weight.detach().clone()
        self._order = magnitude_order(self._original)  # one sort serves every level
        self._work = self._original.flatten().clone()
        self._done = 0

    def prune(self, count: int) -> None:
        # counts increase, so each level only zeroes the weights the previous one kept
        self._work[self._order[self._done:count]] = 0
        self._done = count
        self._weight.copy_(self._work.view_as(self._weight))

    def restore(self) -> None:
        self._weight.copy_(self._original)
        del self._original, self._order, self._work


def _make_runner(
    model: nn.Module, leaves: Iterable[nn.Module], first_batch: torch.Tensor, first_reference: torch.Tensor
) -> _PlainRunner | _ReplayRunner | _SuffixRunner:
    """Trace the model and check the trace reproduces it; otherwise replay module outputs (or, failing that, the plain loop)."""
    try:
        network = TracedNetwork(model, leaves)
        traced_out = network.run_all(first_batch)
        same = isinstance(traced_out, torch.Tensor) and traced_out.shape == first_reference.shape and torch.allclose(
            traced_out, first_reference, rtol=1e-5, atol=1e-6 * float(first_reference.abs().max())
        )
        if not same:
            raise RuntimeError("the traced graph does not reproduce the model's output")
    except Exception as exc:  # any tracing failure only costs speed, never correctness
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        try:
            replay = ModuleReplay(model, first_batch)
        except Exception as replay_exc:  # a forward pass hooks disturb: the plain loop, still exact
            logger.warning("model %s cannot be traced by torch.fx (%s) nor its module calls recorded (%s); estimating "
                           "curves with the plain loop", type(model).__name__, reason[:200], str(replay_exc)[:200])
            return _PlainRunner(model)
        logger.warning("model %s cannot be traced by torch.fx (%s); estimating curves by replaying, for each layer, the "
                       "outputs of the modules that run before it", type(model).__name__, reason[:200])
        return _ReplayRunner(replay)
    return _SuffixRunner(network)


_CACHED_GROUP = 8
"""With ``cache_dir`` and several calibration batches, layers are estimated this many at a time.

Within a group every batch's unpruned forward pass is walked once for all its layers, so a layer
is finished (and cached) only with the group's last batch; smaller groups lose less work to an
interruption, larger ones repeat fewer prefixes. Without a cache, or with one batch (each layer
then finishes in turn anyway), all layers form one group.
"""


def _level_values(
    runner: _PlainRunner | _ReplayRunner | _SuffixRunner,
    session: object,
    unit: PruningUnit,
    counts: list[int],
    reference: torch.Tensor,
    distortion: Distortion,
    bar: tqdm,
) -> np.ndarray:
    """One batch's distortion at each of the increasing pruned ``counts`` of one unit.

    The values stay on the device until the unit's last level: one host synchronisation per unit
    and batch, not one per level, so a GPU is never left idle while Python waits for a number.
    """
    values = torch.zeros(len(counts), dtype=torch.float64, device=reference.device)
    unit.hold()
    try:
        state = runner.prepare(unit.modules, session)  # with the unpruned weights
        for i, count in enumerate(counts):
            unit.prune(count)
            values[i] = distortion.batch(reference, runner.run(unit.modules, state))
            bar.update(1)
        del state
    finally:
        unit.restore()
    values = values.cpu().numpy()
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(f"pruning {unit.name!r} to level {counts[bad[0]]} makes the network output NaN or inf")
    return values


@torch.no_grad()
def _group_distortions(
    runner: _PlainRunner | _ReplayRunner | _SuffixRunner,
    todo: Sequence[tuple[PruningUnit, list[int]]],
    batches: list[torch.Tensor],
    references: list[torch.Tensor],
    distortion: Distortion,
    device: torch.device,
    bar: tqdm,
    finished: Callable[[str, np.ndarray], None],
) -> None:
    """Distortion at each of the increasing pruned counts of each ``(unit, counts)``.

    Batch by batch: a batch's unpruned forward pass is walked once and serves every unit's
    boundary (units in graph order share it; one out of order costs a fresh prefix). Each unit
    is handed to ``finished(name, values)`` as soon as its last batch is done. A suffix that
    turns out unsafe to re-run (in-place updates of its inputs) is redone afterwards with the
    whole model, so a surprise in the traced graph costs speed, never correctness.
    """
    def finish(name: str, totals: np.ndarray) -> None:
        finished(name, distortion.finish(totals, references))

    totals = {unit.name: np.zeros(len(counts), np.float64) for unit, counts in todo}
    active = []
    for unit, counts in todo:
        if counts and runner.affects_output(unit.modules):
            active.append((unit, counts))
        else:
            bar.update(len(counts) * len(batches))
            finish(unit.name, totals[unit.name])

    def add(name: str, values: np.ndarray) -> None:
        totals[name] = distortion.combine(totals[name], values)

    unsafe: list[tuple[PruningUnit, list[int]]] = []
    for b, (x, reference) in enumerate(zip(batches, references)):
        x = x.to(device)
        session = runner.start(x)
        for item in active:
            unit, counts = item
            if item in unsafe:
                continue
            progress_before = bar.n
            try:
                add(unit.name, _level_values(runner, session, unit, counts, reference, distortion, bar))
            except UnsafeSuffix as exc:
                logger.warning("%s %s: %s; using the plain loop for it", unit.kind, unit.name, exc)
                bar.n = progress_before - b * len(counts)
                unsafe.append(item)
                session = runner.start(x)  # the walker's values may have been changed in place
                continue
            if b == len(batches) - 1:
                finish(unit.name, totals[unit.name])
    plain = _PlainRunner(runner.model)
    for unit, counts in unsafe:
        totals[unit.name][:] = 0.0
        for x, reference in zip(batches, references):
            add(unit.name, _level_values(plain, x.to(device), unit, counts, reference, distortion, bar))
        finish(unit.name, totals[unit.name])


def select_units(available: Iterable[str], requested: Iterable[str] | None, what: str) -> list[str]:
    """The ``requested`` units (None: all) in ``available``'s order; ValueError for an unknown or empty request."""
    available = list(available)
    chosen = available if requested is None else [n for n in available if n in set(requested)]
    unknown = sorted(set(requested or ()) - set(available))
    if unknown or not chosen:
        raise ValueError(f"unknown or no {what} requested: {unknown[:5]}; {what} are {available[:8]} ...")
    return chosen


def curve_cache(cache_dir: str | os.PathLike | None, model: nn.Module, batches: list[torch.Tensor],
                settings: str) -> CurveCache | None:
    """The cache of finished curves for this model, these inputs and ``settings`` (None without ``cache_dir``)."""
    return None if cache_dir is None else CurveCache(cache_dir, fingerprint_inputs(model, batches), settings)


@torch.no_grad()
def plain_unit_curves(
    model: nn.Module, units: Mapping[str, tuple[PruningUnit, UnitPlan]], batches: list[torch.Tensor],
    distortion: Distortion, *, recalibrate: bool = False,
) -> dict[str, Curve]:
    """The definition run literally for units of any kind: prune each unit to each level of its plan, run the whole
    model on every batch, compare with the unpruned output (the reference the fast engine is checked against).

    With ``recalibrate``, the unpruned network and every pruned one first have their BatchNorm statistics
    re-estimated on ``batches`` (:func:`recalibrate_batchnorm`); the buffers are restored afterwards.
    """
    device = _model_device(model)
    curves = {}
    buffers = {n: b.clone() for n, b in model.named_buffers()} if recalibrate else {}
    moved = [b.to(device) for b in batches] if recalibrate else batches

    def renormalise() -> None:
        if recalibrate:
            recalibrate_batchnorm(model, moved)

    try:
        with evaluation(model):
            renormalise()
            references = _reference_outputs(model, batches, device)
            for name, (unit, plan) in units.items():
                values = np.zeros(len(plan.counts), np.float64)
                unit.hold()
                try:
                    for k, count in enumerate(plan.counts):
                        unit.prune(count)
                        renormalise()
                        for x, reference in zip(batches, references):
                            values[k] = distortion.combine(values[k], float(distortion.batch(reference, model(x.to(device)))))
                finally:
                    unit.restore()
                curves[name] = Curve(plan.amounts, distortion.finish(values, references))
    finally:
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])
    return curves


def unit_curves(
    model: nn.Module,
    leaves: Iterable[nn.Module],
    plans: Mapping[str, tuple[PruningUnit, UnitPlan]],
    batches: list[torch.Tensor],
    distortion: Distortion,
    cache: CurveCache | None,
    progress: bool,
) -> dict[str, Curve]:
    """Curves of units (layers or channel groups) on their level plans: the engine shared by every granularity.

    ``leaves`` are every prunable layer (kept whole in the traced graph); a plan's ``counts`` are
    what ``unit.prune`` takes, ``zeros`` the count already pruned (levels at or below it cost no
    forward pass: distortion 0). Cached units are loaded, the others estimated and saved.
    """
    device = _model_device(model)
    curves: dict[str, Curve] = {}
    if cache is not None:
        for n, (_, plan) in plans.items():
            cached = cache.load(n, plan.level_range)
            if cached is not None:
                curves[n] = cached
    pending = [n for n in plans if n not in curves]
    with evaluation(model):
        work = sum(len(plans[n][1].to_run) for n in pending) * len(batches)
        references = _reference_outputs(model, batches, device) if work else []
        runner = _make_runner(model, leaves, batches[0].to(device), references[0]) if work else None

        def finished(n: str, values: np.ndarray) -> None:
            plan = plans[n][1]
            by_count = dict(zip(plan.to_run, values))
            curve = Curve(plan.amounts, np.array([by_count.get(c, 0.0) for c in plan.counts], np.float64))
            if cache is not None:
                cache.save(n, plan.level_range, curve)
            curves[n] = curve
            stop.check_local("curve estimation")  # a safe point: the units finished so far are cached

        with tqdm(total=work, desc="rd curves", unit="fwd", disable=not progress) as bar:
            for n in [n for n in pending if not plans[n][1].to_run]:
                finished(n, np.zeros(0))
            todo = [(plans[n][0], plans[n][1].to_run) for n in pending if plans[n][1].to_run]
            group = _CACHED_GROUP if cache is not None and len(batches) > 1 else max(len(todo), 1)
            for start in range(0, len(todo), group):
                _group_distortions(runner, todo[start:start + group], batches, references, distortion, device, bar, finished)
    return {n: curves[n] for n in plans}


def estimate_curves(
    model: nn.Module,
    inputs: torch.Tensor | Iterable[torch.Tensor],
    levels: int = 101,
    *,
    grid: Grid = "relative",
    worst_case: bool = False,
    measure: Measure = "mse",
    layers: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    level_ranges: Mapping[str, tuple[int, int]] | None = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    min_density: float = 0.0,
    bn_aware: bool = False,
) -> dict[str, Curve]:
    """Rate-distortion curve of each prunable layer (``layers``: a subset, e.g. one rank's shard).

    ``inputs`` is one tensor (split into ``batch_size`` batches) or a re-iterable of batches.
    ``level_ranges`` maps a layer to ``(start, stop)`` indices into :func:`layer_amounts`; such a
    layer gets a partial curve (join pieces with :func:`merge_curve_pieces`). Each layer's grid
    stops at its floor (one weight per output unit on average, and ``min_density`` of its
    weights; see :mod:`rdprune.core.floor`), never at 1. With ``cache_dir``
    each finished layer is written there at once and reused by a later call with identical
    model, inputs and settings. ``bn_aware`` measures each pruned network with BatchNorm
    statistics re-estimated on ``inputs`` (module notes); it needs ``inputs`` in one batch
    (``batch_size`` >= their number) to be fast. ``measure`` is the output distortion (``mse`` or
    ``kl``; :mod:`rdprune.core.distortion`), ``worst_case`` takes its worst sample instead of the
    mean. Runs on the model's device; the model is left exactly as it was.
    """
    min_density = check_min_density(min_density)
    distortion = Distortion(measure, worst_case)
    every, chosen = _select_layers(model, layers, skip)
    level_ranges = dict(level_ranges or {})
    unknown = sorted(set(level_ranges) - set(chosen))
    if unknown:
        raise ValueError(f"level_ranges names layers that are not being estimated: {unknown[:5]}")
    batches = as_batches(inputs, batch_size)
    device = _model_device(model)
    plans = {n: layer_plan(n, m, levels, grid, level_ranges.get(n), min_density) for n, m in chosen.items()}
    # The floor rule is part of the grid: "floor=units" marks grids capped at one weight per
    # output unit, so curves cached before the floor existed (top level 1) are not reused.
    cache = curve_cache(cache_dir, model, batches, f"levels={levels}:grid={grid}:{distortion.cache_key}:floor=units"
                                                   f":min_density={min_density!r}:bn_aware={bool(bn_aware)}")
    bn_aware = bn_aware and bool(batchnorm_layers(model))
    if not (bn_aware and len(batches) > 1):
        renormalised = batch_statistics(model) if bn_aware else contextlib.nullcontext()
        with renormalised:
            units = {n: (_LayerUnit(n, m), plans[n]) for n, m in chosen.items()}
            return unit_curves(model, every.values(), units, batches, distortion, cache, progress)
    curves = {n: cache.load(n, plans[n].level_range) if cache is not None else None for n in chosen}
    if any(c is None for c in curves.values()):
        logger.warning(
            "BatchNorm-aware curves: the %d calibration inputs span %d batches, so each level is measured by the "
            "plain definition (re-estimating the statistics layer by layer); a batch_size of at least %d "
            "measures them in one pass", sum(len(b) for b in batches), len(batches), sum(len(b) for b in batches),
        )
    for n, curve in curves.items():
        if curve is None:
            curves[n] = _recalibrated_curve(model, chosen[n], plans[n], batches, distortion, device)
            if cache is not None:
                cache.save(n, plans[n].level_range, curves[n])
            stop.check_local("curve estimation")
    return curves


def curve_costs(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[int],
    levels: int = 101,
    grid: Grid = "relative",
    layers: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    min_density: float = 0.0,
) -> dict[str, tuple[float, int]]:
    """Per layer: (FLOPs that one level of it re-runs, levels still needing a forward pass).

    ``inputs`` is a calibration batch or the shape of one sample (a batch of one is then used).
    The FLOPs are those of the layer's suffix; for a model fx cannot trace, the whole network.
    A sharder balances ranks by ``flops * levels``.
    """
    every, chosen = _select_layers(model, layers, skip)
    device = _model_device(model)
    x = inputs if isinstance(inputs, torch.Tensor) else torch.zeros(1, *inputs)
    x = x.to(device)
    with evaluation(model):
        reference = _check_output(model(x), x, "on the cost-estimation batch")
        runner = _make_runner(model, every.values(), x, reference)
        if isinstance(runner, _SuffixRunner):
            node_flops = runner.network.node_flops(x)
            suffix_flops = {n: sum(node_flops[v] for v in runner.network.plan(m).suffix) for n, m in chosen.items()}
        else:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                model(x)
            suffix_flops = {n: counter.get_total_flops() for n in chosen}
    return {n: (float(suffix_flops[n]), len(layer_plan(n, m, levels, grid, None, min_density).to_run)) for n, m in chosen.items()}


@torch.no_grad()
def plain_curves(
    model: nn.Module,
    inputs: torch.Tensor | Iterable[torch.Tensor],
    levels: int = 101,
    *,
    grid: Grid = "relative",
    worst_case: bool = False,
    measure: Measure = "mse",
    layers: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    batch_size: int = 64,
    min_density: float = 0.0,
    bn_aware: bool = False,
) -> dict[str, Curve]:
    """The definition, run literally: for every layer and level, prune, run the whole model, compare.

    With ``bn_aware``, every pruned network (and the unpruned reference) first has its BatchNorm
    statistics re-estimated on ``inputs``. The reference that :func:`estimate_curves` is tested
    and benchmarked against.
    """
    distortion = Distortion(measure, worst_case)
    _, chosen = _select_layers(model, layers, skip)
    batches = as_batches(inputs, batch_size)
    device = _model_device(model)
    if bn_aware and batchnorm_layers(model):
        return {name: _recalibrated_curve(model, module, layer_plan(name, module, levels, grid, None, min_density),
                                          batches, distortion, device, every_level=True)
                for name, module in chosen.items()}
    curves = {}
    with evaluation(model):
        references = _reference_outputs(model, batches, device)
        for name, module in chosen.items():
            amounts = layer_amounts(module, levels, grid, min_density)
            original = module.weight.detach().clone()
            values = np.zeros(len(amounts), np.float64)
            try:
                for k, amount in enumerate(amounts):
                    mask = magnitude_mask(original, pruned_count(float(amount), original.numel()))
                    module.weight.copy_(original * mask)
                    for x, reference in zip(batches, references):
                        values[k] = distortion.combine(values[k], float(distortion.batch(reference, model(x.to(device)))))
            finally:
                module.weight.copy_(original)
            curves[name] = Curve(amounts, distortion.finish(values, references))
    return curves


@torch.no_grad()
def _recalibrated_curve(
    model: nn.Module, module: nn.Module, plan: UnitPlan, batches: list[torch.Tensor], distortion: Distortion,
    device: torch.device, every_level: bool = False,
) -> Curve:
    """One layer's BatchNorm-aware curve by the definition: prune, re-estimate the statistics, run, compare.

    Levels that prune nothing new are the unpruned network itself (distortion 0) and are run only
    with ``every_level``. BatchNorm buffers and the weight are restored afterwards.
    """
    batches = [b.to(device) for b in batches]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    original = module.weight.detach().clone()
    values = np.zeros(len(plan.counts), np.float64)
    try:
        with evaluation(model):
            recalibrate_batchnorm(model, batches)
            references = _reference_outputs(model, batches, device)
            for k, count in enumerate(plan.counts):
                if count <= plan.zeros and not every_level:
                    continue
                module.weight.copy_(original * magnitude_mask(original, count))
                recalibrate_batchnorm(model, batches)
                for x, reference in zip(batches, references):
                    values[k] = distortion.combine(values[k], float(distortion.batch(reference, model(x.to(device)))))
                module.weight.copy_(original)
    finally:
        module.weight.copy_(original)
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return Curve(plan.amounts, distortion.finish(values, references))

