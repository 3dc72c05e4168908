"""Measured latency model for channel pruning: per-layer time tables plus a term for the rest of the network.

The allocator asks "how long does one forward pass take when each conv/linear layer keeps (in, out)
channels?". :class:`LatencyTable` answers from times measured on the run's device:

* every distinct conv2d/linear layer signature is timed on a coarse grid of (kept in, kept out) channel
  counts with random tensors and ``torch.nn.functional`` ops, and bilinearly interpolated in between;
* the dense model is timed piece by piece (forward hooks mark where each tabulated layer starts and ends):
  each layer's grid is rescaled to the layer's time inside the model, and everything between the layers
  (BatchNorm, activations, additions, pooling, Python and framework overhead) is the term ``other``, scaled
  for a pruned model by the fraction of conv/linear output activations it keeps (those activations are what
  BatchNorm, activations and additions read and write).

Why pieces rather than ``other = model time - sum of isolated layer times``: on a shared CPU a median of a
short call misses the preemptions that a long call (the whole model) always contains, so the difference
swallowed the load of other processes and then shrank with the activations as if it were work. Medians of
pieces of similar length to the layer timings are consistent with them; the plain forward pass, timed
interleaved with the hooked one, then fixes one common factor so that the table's dense prediction is the
measured dense latency.
"""
from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from rdprune.core.runtimes import BLOCKED, BLOCKED_FROM_PLAIN, PLAIN, Runtime, TorchRuntime, graph_links
from rdprune.core.timing import LayerShape, interleaved_samples, torch_threads

if TYPE_CHECKING:  # a space's widths are read, never built, here
    from rdprune.core.curves import UnitPlan
    from rdprune.granularity.channel.space import ChannelSpace

log = logging.getLogger(__name__)

JSON_FORMAT = "rdprune-latency/1"
# Grid timings: each sweep visits every row of a grid and times its points in round robin, _GRID_WARMUP rounds
# discarded then _GRID_REPEATS kept; a point's time is the median over all sweeps, so a load spike that lasts a
# whole row corrupts only one sweep's share of its samples.
_GRID_SWEEPS, _GRID_REPEATS, _GRID_WARMUP = 3, 3, 1
# Dense pass (plain and hooked forward pass, alternating): at most this many rounds, at least the minimum.
_DENSE_REPEATS, _DENSE_MIN_REPEATS, _DENSE_WARMUP = 15, 3, 2
_DENSE_SHARE = 0.3  # the dense pass may take this share of time_limit_s before the grids are timed
_CALL_OVERHEAD_S = 2e-5  # a priori cost of one timed call on top of its FLOPs-proportional share


# ---------------------------------------------------------------------------------------------- grids


def _multiple(shape: LayerShape) -> int:
    """Channel counts of a grouped (not depthwise) conv stay multiples of its groups."""
    return 1 if shape.depthwise else shape.groups


def channel_values(dense: int, points: int, multiple: int = 1) -> tuple[int, ...]:
    """About `points` kept-channel counts from a small one to `dense`, for one layer dimension.

    Small dimensions (at most `points` admissible counts) get every count; larger ones get evenly spaced
    counts rounded to multiples of 8 (16 for dimensions of 512 or more), where vector units and library
    kernels run at their regular speed, plus the smallest admissible count and the dense count.
    """
    if points < 2:
        raise ValueError(f"a grid needs points >= 2 (a small count and the dense count), got {points}")
    admissible = dense // multiple
    if admissible <= points:
        return tuple(multiple * k for k in range(1, admissible + 1))
    step = 16 if dense >= 512 else 8 if dense >= 32 else 1
    step = math.lcm(step, multiple)
    targets = np.linspace(dense / (points - 1), dense, points - 1)
    rounded = {min(dense, max(step, step * round(t / step))) for t in targets}
    return tuple(sorted(rounded | {multiple, dense}))


def _coarsen(values: tuple[int, ...], points: int) -> tuple[int, ...]:
    """At most `points` of `values`, evenly spread by index, the first and last always kept."""
    if len(values) <= points:
        return values
    picks = np.unique(np.round(np.linspace(0, len(values) - 1, points)).astype(int))
    return tuple(values[k] for k in picks)


def _full_grid(shape: LayerShape, points: int, override: tuple[Sequence[int], Sequence[int]] | None) -> tuple[tuple[int, ...], ...]:
    """The layer's (kept in, kept out) grid before any coarsening; depthwise layers have one axis."""
    if override is None:
        m = _multiple(shape)
        if shape.depthwise:
            return (channel_values(shape.out_channels, points),)
        return channel_values(shape.in_channels, points, m), channel_values(shape.out_channels, points, m)
    axes = tuple(tuple(sorted(set(int(v) for v in axis))) for axis in override)
    dense = (shape.in_channels, shape.out_channels)
    for axis, n in zip(axes, dense):
        if not axis or axis[0] < 1 or axis[-1] != n:
            raise ValueError(f"channel_grid for {shape.name}: counts must lie in [1, {n}] and include the dense count {n}, got {axis}")
    if shape.depthwise:
        if axes[0] != axes[1]:
            raise ValueError(f"channel_grid for depthwise {shape.name}: the in and out counts must be equal")
        return axes[:1]
    return axes


def _full_grids(shapes: Mapping[str, LayerShape], points: int,
                channel_grid: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None) -> dict[str, tuple[tuple[int, ...], ...]]:
    unknown = sorted(set(channel_grid or {}) - set(shapes))
    if unknown:
        raise ValueError(f"channel_grid names layers that are not in shapes: {unknown}")
    return {name: _full_grid(s, points, (channel_grid or {}).get(name)) for name, s in shapes.items()}


def _signature_groups(shapes: Mapping[str, LayerShape], full: Mapping[str, tuple],
                      fused: Mapping[str, tuple[bool, bool]]) -> list[list[str]]:
    """Names of the layers timed once, together: one signature, one grid, one (activation, residual) fused after it."""
    signatures: dict[tuple, list[str]] = {}
    for name, s in shapes.items():
        key = (s.kind, s.kernel_size, s.stride, s.padding, s.dilation, s.groups, s.bias, s.in_hw, s.in_channels, s.out_channels,
               full[name], fused.get(name, (False, False)))
        signatures.setdefault(key, []).append(name)
    return list(signatures.values())


def _work(shape: LayerShape) -> float:
    """Multiply-adds per sample of the dense layer (a priori share of the model's time)."""
    kh, kw = shape.kernel_size
    per_group = shape.in_channels // max(shape.groups, 1)
    return float(per_group * shape.out_channels * kh * kw * shape.out_hw[0] * shape.out_hw[1])


def _keyword_maker(layer_calls: Callable[..., list[Callable]]) -> Callable[[int, Sequence[int], int], list[Callable]]:
    """``runtime.layer_calls`` partially applied, as ``make(kept_in, outs, groups)`` for :func:`_time_grid`."""
    return lambda kept_in, outs, groups: layer_calls(kept_in=kept_in, outs=outs, groups=groups)


def _coarse_grid(full: tuple[tuple[int, ...], ...], points: int) -> tuple[tuple[int, ...], ...]:
    return tuple(_coarsen(axis, points) for axis in full)


# ------------------------------------------------------------------------------------- layer timing


def torch_layer_calls(shape: LayerShape, batch: int, device: torch.device, kept_in: int, outs: Sequence[int],
                      groups: int) -> list[Callable]:
    """One call per kept-out count, all sharing one random input and one weight (out-prefix views stay contiguous)."""
    top = max(outs)
    bias = torch.randn(top, device=device) if shape.bias else None
    if shape.kind == "linear":
        x = torch.randn(batch * shape.in_hw[0] * shape.in_hw[1], kept_in, device=device)
        w = torch.randn(top, kept_in, device=device)
        return [functools.partial(F.linear, x, w[:o], None if bias is None else bias[:o]) for o in outs]
    x = torch.randn(batch, kept_in, *shape.in_hw, device=device)
    w = torch.randn(top, kept_in // groups, *shape.kernel_size, device=device)
    return [functools.partial(F.conv2d, x, w[:o], None if bias is None else bias[:o], shape.stride, shape.padding, shape.dilation, groups)
            for o in outs]


@dataclass(frozen=True)
class GridTimes:
    """One layer grid's timings: median seconds per point, and where the calls profile themselves each point's kernel
    path, layout (:data:`rdprune.core.runtimes.PLAIN`...) and the reorder seconds per element moved that it showed."""

    times: np.ndarray
    paths: np.ndarray | None = None
    layouts: np.ndarray | None = None
    reorder_rates: tuple[float, ...] = ()


def _time_grid(shape: LayerShape, grid: tuple[tuple[int, ...], ...], batch: int, device: torch.device,
               make: Callable[..., list[Callable]] | None = None) -> GridTimes:
    """Median seconds at every grid point over several sweeps of its rows, and what profiled calls say of each point.

    A row (the points of one kept-in count; depthwise: the whole axis) shares its tensors and is timed
    interleaved; its tensors are made afresh in each sweep, so memory stays about twice the dense layer's.
    ``make(kept_in, outs, groups)`` gives a runtime's calls instead of ``torch.nn.functional`` ones; such a
    row (sessions, costly to make) is made once and swept in place before the next row is made. Calls that
    profile themselves (:class:`rdprune.core.runtimes.ProfiledLayerCall`) give their kernels' time and path
    instead of the wall time of the call, with its layout.
    """
    in_place = make is not None
    if make is None:
        make = functools.partial(torch_layer_calls, shape, batch, device)
    if shape.depthwise:
        rows = [lambda: [make(c, [c], c)[0] for c in grid[0]]]
    else:
        rows = [functools.partial(make, i, grid[1], shape.groups) for i in grid[0]]
    samples: list[list[list[float]]] = [[[] for _ in grid[-1]] for _ in rows]
    profiles: list[list] = []
    if in_place:
        for row, make_calls in zip(samples, rows):
            calls = make_calls()
            for _ in range(_GRID_SWEEPS):
                for point, new in zip(row, interleaved_samples(calls, _GRID_REPEATS, _GRID_WARMUP, device)):
                    point.extend(new)
            if all(hasattr(call, "kernels") for call in calls):
                profiles.append([call.kernels() for call in calls])
                row[:] = [[k.seconds] for k in profiles[-1]]
            del calls
    else:
        for _ in range(_GRID_SWEEPS):
            for row, make_calls in zip(samples, rows):
                for point, new in zip(row, interleaved_samples(make_calls(), _GRID_REPEATS, _GRID_WARMUP, device)):
                    point.extend(new)
    medians = np.array([[statistics.median(point) for point in row] for row in samples])
    if len(profiles) != len(rows):
        return GridTimes(medians[0] if shape.depthwise else medians)
    paths = np.array([[k.path for k in row] for row in profiles], dtype=object)
    layouts = np.array([[k.layout for k in row] for row in profiles], dtype=np.int64)
    rates = tuple(k.reorder_s for row in profiles for k in row if k.reorder_s is not None)
    if shape.depthwise:
        return GridTimes(medians[0], paths[0], layouts[0], rates)
    return GridTimes(medians, paths, layouts, rates)


def _grid_cost(grid: tuple[tuple[int, ...], ...], dense_time: float) -> float:
    """A priori seconds to time `grid`: per call a fixed overhead plus the dense time scaled by the kept work."""
    fractions = [np.asarray(axis, np.float64) / axis[-1] for axis in grid]
    work = fractions[0].sum() if len(grid) == 1 else fractions[0].sum() * fractions[1].sum()
    calls = math.prod(len(axis) for axis in grid)
    return _GRID_SWEEPS * (_GRID_REPEATS + _GRID_WARMUP) * (calls * _CALL_OVERHEAD_S + work * dense_time)


def _plan_points(pending: Sequence[tuple[tuple[tuple[int, ...], ...], float]], points: int, budget_s: float) -> int:
    """The most grid points per axis (at least 2) with which every pending (full grid, dense time) fits `budget_s`."""
    for p in range(points, 1, -1):
        if sum(_grid_cost(_coarse_grid(full, p), t) for full, t in pending) <= budget_s:
            return p
    return 2


def level_widths(space: ChannelSpace, plans: Mapping[str, UnitPlan]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per convolution and linear layer of ``space``: the (kept in, kept out) channel counts an allocation on ``plans`` can give it.

    Each group is moved through its plan's levels with every other group where it is now; a layer's axis is the
    union of the counts its dimension takes, plus its dense count (a table's axes end there). A latency table
    timed on these counts (``LatencyTable.build(channel_grid=...)``) is exact at every width the allocation
    chooses, where interpolating between even counts misses the steps kernels take between multiples of their
    vector width (an ONNX Runtime convolution keeping 57 output channels costs what it costs at 64).
    """
    current = {g: space.removed(g) for g in space.groups}
    dense = space.kept_channels({})
    axes = {name: ({i, kept[0]}, {o, kept[1]}) for (name, (i, o)), kept in zip(dense.items(), space.kept_channels(current).values())}
    for group, plan in plans.items():
        touched = {s.layer for s in space.groups[group].slices}
        for count in plan.counts:
            kept = space.kept_channels({**current, group: count})
            for name in touched:
                axes[name][0].add(kept[name][0])
                axes[name][1].add(kept[name][1])
    return {name: (tuple(sorted(ins)), tuple(sorted(outs))) for name, (ins, outs) in axes.items()}


# ---------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class LayerGrid:
    """Measured seconds of one layer on a grid of kept channel counts.

    ``times[a][b]`` is the time keeping ``kept_in[a]`` input and ``kept_out[b]`` output channels; both
    axes are strictly increasing and end at the dense count. A depthwise layer has one channel count:
    ``kept_in == kept_out`` and ``times`` is 1-d. ``out_hw`` is the output spatial size (linear: rows per
    sample, 1), used to weigh the layer's output activations in the term for the rest of the network.
    ``layout`` (same shape as ``times``, where the runtime has layouts): the layout each point runs in
    (:data:`rdprune.core.runtimes.PLAIN`, ``BLOCKED``, ``BLOCKED_FROM_PLAIN``).
    """

    kept_in: tuple[int, ...]
    kept_out: tuple[int, ...]
    times: np.ndarray
    out_hw: tuple[int, int] = (1, 1)
    depthwise: bool = False
    layout: np.ndarray | None = None

    def __post_init__(self) -> None:
        kin, kout = tuple(int(v) for v in self.kept_in), tuple(int(v) for v in self.kept_out)
        times = np.array(self.times, dtype=np.float64)
        for axis in (kin, kout):
            if not axis or axis[0] < 1 or any(b <= a for a, b in zip(axis, axis[1:])):
                raise ValueError(f"grid counts must be positive and strictly increasing, got {axis}")
        expected = (len(kin),) if self.depthwise else (len(kin), len(kout))
        if self.depthwise and kin != kout:
            raise ValueError("a depthwise grid has one channel axis: kept_in must equal kept_out")
        if times.shape != expected or not np.all(np.isfinite(times)):
            raise ValueError(f"times must be finite with shape {expected}, got shape {times.shape}")
        times.flags.writeable = False
        if self.layout is not None:
            layout = np.array(self.layout, dtype=np.int64)
            if layout.shape != expected or not np.isin(layout, (PLAIN, BLOCKED, BLOCKED_FROM_PLAIN)).all():
                raise ValueError(f"layout must hold {PLAIN}, {BLOCKED} or {BLOCKED_FROM_PLAIN} with shape {expected}, got {self.layout}")
            layout.flags.writeable = False
            object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "kept_in", kin)
        object.__setattr__(self, "kept_out", kout)
        object.__setattr__(self, "times", times)
        object.__setattr__(self, "out_hw", tuple(int(v) for v in self.out_hw))

    @property
    def dense_time(self) -> float:
        return float(self.times[-1] if self.depthwise else self.times[-1, -1])

    @property
    def dense_activations(self) -> int:
        """Output activations per sample of the dense layer."""
        return self.kept_out[-1] * self.out_hw[0] * self.out_hw[1]

    def layout_at(self, kept_in: int, kept_out: int) -> int | None:
        """The layout of a timed point (None off the grid, or where the table has no layouts)."""
        if self.layout is None or kept_in not in self.kept_in or kept_out not in self.kept_out:
            return None
        return int(self.layout[self.kept_in.index(kept_in)] if self.depthwise else
                   self.layout[self.kept_in.index(kept_in), self.kept_out.index(kept_out)])

    def time(self, kept_in: int, kept_out: int) -> float:
        """Interpolated seconds: linear on a depthwise axis, bilinear otherwise; exact at grid points."""
        if self.depthwise:
            if kept_in != kept_out:
                raise ValueError(f"a depthwise layer keeps as many input as output channels, got ({kept_in}, {kept_out})")
            a, b, t = _bracket(self.kept_in, kept_in)
            return float((1.0 - t) * self.times[a] + t * self.times[b])
        a0, a1, s = _bracket(self.kept_in, kept_in)
        b0, b1, t = _bracket(self.kept_out, kept_out)
        v = self.times
        return float((1.0 - s) * (1.0 - t) * v[a0, b0] + s * (1.0 - t) * v[a1, b0] + (1.0 - s) * t * v[a0, b1] + s * t * v[a1, b1])


def _bracket(axis: tuple[int, ...], value: int) -> tuple[int, int, float]:
    """Indices of the grid cell around `value` and its fractional position; `value` must lie within the grid."""
    if not axis[0] <= value <= axis[-1]:
        raise ValueError(f"kept channel count {value} is outside the measured range [{axis[0]}, {axis[-1]}]")
    a = min(int(np.searchsorted(axis, value, side="right")) - 1, max(len(axis) - 2, 0))
    b = min(a + 1, len(axis) - 1)
    return a, b, 0.0 if a == b else (value - axis[a]) / (axis[b] - axis[a])


class LatencyTable:
    """Per-layer latency measured on a coarse grid of (kept input channels, kept output channels), interpolated.

    Build one from measurements with :meth:`build`, or from fixed numbers (tests, other modules' tests) with
    ``LatencyTable({name: LayerGrid(...)}, other=...)`` or :meth:`from_json`. ``other`` is the time of
    everything outside the tabulated layers in the dense model. :meth:`build` measures it as a sum of medians
    of pieces of the forward pass, so it cannot come out negative; a hand-made table may use any value, and
    a negative one is kept as given (predictions then grow as output channels are removed).
    ``meta`` records how the table was built (device, threads, batch, measured dense seconds, build seconds).

    Where the runtime runs layers in different memory layouts (ONNX Runtime's blocked NCHWc layout holds only
    some channel counts), ``links`` (:attr:`rdprune.core.runtimes.GraphLinks.inputs`) and ``reorder_s`` (seconds
    per channel x pixel moved) price the reorders a pruned model runs where a layer and the layer it reads from
    end up in different layouts (:attr:`LayerGrid.layout`), one per tensor and direction, as a change from the
    dense model's (whose reorders are in ``other``).
    """

    def __init__(self, layers: Mapping[str, LayerGrid], other: float, meta: Mapping[str, object] | None = None,
                 links: Mapping[str, Sequence[tuple[str, int, int]]] | None = None, reorder_s: float = 0.0):
        if not layers:
            raise ValueError("a latency table needs at least one layer")
        self.layers: dict[str, LayerGrid] = dict(layers)
        self.other = float(other)
        self.meta: dict[str, object] = dict(meta or {})
        self.links = {name: tuple((str(p), int(h), int(w)) for p, h, w in links_in) for name, links_in in (links or {}).items()}
        unknown = sorted(({p for ls in self.links.values() for p, _, _ in ls} | set(self.links)) - set(self.layers))
        if unknown:
            raise ValueError(f"links name layers not in the table: {unknown}")
        self.reorder_s = float(reorder_s)
        self._dense_activations = sum(g.dense_activations for g in self.layers.values())
        self._dense_reorders = self.reorders({})

    def reorders(self, kept: Mapping[str, tuple[int, int]]) -> float:
        """Predicted seconds of the reorders between linked layers that run in different layouts when layer `name` keeps
        kept[name] = (in, out) channels: per layer read from, one reorder out of the blocked layout if any reader runs
        plain, one into it if it runs plain and a reader runs blocked, each of the largest tensor it serves. A layer
        at counts the table did not time has no known layout: its links add nothing."""
        if not self.links or self.reorder_s == 0.0:
            return 0.0
        kept = {name: kept.get(name, (g.kept_in[-1], g.kept_out[-1])) for name, g in self.layers.items()}
        layout = {name: g.layout_at(*kept[name]) for name, g in self.layers.items()}
        moved: dict[tuple[str, bool], int] = {}
        for reader, sources in self.links.items():
            for source, h, w in sources:
                if layout[reader] is None or layout[source] is None:
                    continue
                writes_blocked, reads_blocked = layout[source] != PLAIN, layout[reader] == BLOCKED
                if writes_blocked != reads_blocked:
                    key = (source, writes_blocked)
                    moved[key] = max(moved.get(key, 0), kept[source][1] * h * w)
        return self.reorder_s * sum(moved.values())

    @classmethod
    def build(cls, model: nn.Module, example: torch.Tensor, shapes: Mapping[str, LayerShape], *,
              channel_grid: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
              points: int = 11, device: torch.device | str = "cpu", threads: int | None = None,
              time_limit_s: float = 300.0, progress: bool = False, runtime: Runtime | None = None) -> LatencyTable:
        """Measure `model` (on `device`, in eval mode) and each distinct layer of `shapes` on `device`.

        Layers with one signature (kind, kernel, stride, padding, dilation, groups, bias, input size, dense
        counts, batch) and one grid are timed once. The dense model is timed first (see the module docstring);
        the grids then take what is left of `time_limit_s`, coarsened (with a warning) when the estimate says
        the remaining layers would not fit.

        ``channel_grid`` (:func:`level_widths`): the (kept in, kept out) counts to time per layer, instead of
        ``points`` evenly spaced ones (:func:`channel_values`); each must end at the dense count.

        ``runtime`` (default: torch eager on `device` with `threads`) is what is timed; its :meth:`Runtime.key`
        goes into ``meta``. A runtime that runs layers of its own (ONNX Runtime: fused graphs) is timed by
        :meth:`_build_separate`.
        """
        if runtime is None:
            runtime = TorchRuntime(threads, device)
        device, threads = runtime.device, runtime.threads
        if channel_grid:  # given counts are all timed while the time limit allows (coarsened only to meet it)
            points = max(points, *(len(axis) for axes in channel_grid.values() for axis in axes))
        if runtime.separate_layers:
            table = cls._build_separate(model, example, shapes, runtime, channel_grid, points, time_limit_s, progress)
            return table._asked(channel_grid)
        start = time.perf_counter()
        example = example.to(device)
        batch = int(example.shape[0])
        full = _full_grids(shapes, points, channel_grid)
        groups = _signature_groups(shapes, full, {})
        with torch_threads(threads), torch.inference_mode():
            inside, other = _dense_pass(model, example, list(shapes), device, time_limit_s)
            grids = _grid_pass([shapes[g[0]] for g in groups], [full[g[0]] for g in groups], [inside[g[0]] for g in groups], batch,
                               device, points, time_limit_s - (time.perf_counter() - start), progress)
        layers = {}
        for g, (grid, timed) in zip(groups, grids):
            times = timed.times
            for name in g:
                scaled = times * (inside[name] / (times[-1] if len(grid) == 1 else times[-1, -1]))
                layers[name] = LayerGrid(grid[0], grid[-1], scaled, shapes[name].out_hw, len(grid) == 1)
        layers = {name: layers[name] for name in shapes}
        meta = {**runtime.key(), "batch": batch, "measured_dense": other + sum(inside.values()),
                "build_seconds": time.perf_counter() - start}
        return cls(layers, other, meta)._asked(channel_grid)

    def _asked(self, channel_grid: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None) -> LatencyTable:
        """Record the counts the build was asked to time (the time limit may have coarsened them) in ``meta``."""
        if channel_grid:
            self.meta["channel_grid"] = {name: [[int(v) for v in axis] for axis in axes] for name, axes in channel_grid.items()}
        return self

    @classmethod
    def _build_separate(cls, model: nn.Module, example: torch.Tensor, shapes: Mapping[str, LayerShape], runtime: Runtime,
                        channel_grid: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None, points: int, time_limit_s: float,
                        progress: bool) -> LatencyTable:
        """The table in a runtime that runs the model as a whole graph (ONNX Runtime): no hooks inside it.

        Each layer signature's grid is timed as the runtime runs the layer (:meth:`Runtime.layer_calls`: for ONNX
        Runtime a single-layer graph, with the residual addition and the ReLU the exported model has after the layer):
        each point's kernel time and kernel path where the calls profile themselves, else its wall time less the
        runtime's fixed cost of one call. The points on the dense point's path are rescaled so that the dense point is
        the layer's time inside the whole model (:meth:`Runtime.inside_times`: ONNX Runtime's profile of the exported
        model, plain runs alternating with profiled ones); points on another path keep their time. ``other`` is the
        plain model's median less the layers' times inside it (everything else: pooling, reorders, the call), scaled
        by the activations kept as in the torch table. Where the calls report layouts, each point's layout, the
        graph's links and the median reorder seconds per element the single-layer graphs moved price the reorders
        that pruning adds or removes (:meth:`reorders`).
        """
        start = time.perf_counter()
        example = example.cpu()
        batch = int(example.shape[0])
        full = _full_grids(shapes, points, channel_grid)
        links = graph_links(model, example, shapes)
        activations, residuals = links.activations, links.residuals
        fused = {name: (name in activations, name in residuals) for name in shapes}
        groups = _signature_groups(shapes, full, fused)
        dense_s, inside = runtime.inside_times(model, example, shapes, (_DENSE_MIN_REPEATS, 2 * _DENSE_REPEATS),
                                               _DENSE_SHARE * time_limit_s, _DENSE_WARMUP)
        missing = [name for name in shapes if name not in inside]
        if missing:
            log.warning("latency table (%s): %d layers not found in the runtime's profile (e.g. %s); their times are "
                        "those of the layer alone", runtime.name, len(missing), missing[0])
        overhead = runtime.call_overhead()
        work = {name: _work(s) for name, s in shapes.items()}
        estimate = {name: inside.get(name, dense_s * w / sum(work.values())) for name, w in work.items()}
        makers = [functools.partial(runtime.layer_calls, shapes[g[0]], batch, activation=fused[g[0]][0], residual=fused[g[0]][1])
                  for g in groups]
        grids = _grid_pass([shapes[g[0]] for g in groups], [full[g[0]] for g in groups], [estimate[g[0]] for g in groups], batch,
                           runtime.device, points, time_limit_s - (time.perf_counter() - start), progress,
                           [_keyword_maker(m) for m in makers])
        layers = {}
        for g, (grid, timed) in zip(groups, grids):
            times, paths = timed.times, timed.paths
            if paths is None:
                # wall times: less the runtime's fixed cost of a call, but never more than half the cheapest point (a
                # layer that costs about the fixed cost keeps its shape, and a dense point near zero cannot blow up)
                times = times - min(overhead, 0.5 * float(times.min()))
            dense_point = times[-1] if len(grid) == 1 else times[-1, -1]
            for name in g:
                # the layer inside the model against alone, measured at its dense counts, corrects the points that the
                # same kernels run; a count that takes another path (off the blocked layout) keeps its own time
                scale = inside[name] / dense_point if name in inside else 1.0
                factor = scale if paths is None else np.where(paths == paths.flat[-1], scale, 1.0)
                layers[name] = LayerGrid(grid[0], grid[-1], times * factor, shapes[name].out_hw, len(grid) == 1, timed.layouts)
        layers = {name: layers[name] for name in shapes}
        rates = [r for _, timed in grids for r in timed.reorder_rates]
        inside = sum(layer.dense_time for layer in layers.values())
        other = dense_s - inside
        if other < 0:
            log.warning("latency table (%s): the layers timed alone take %.3f ms, more than the whole model's %.3f ms; the rest "
                        "of the network counts as 0", runtime.name, 1e3 * inside, 1e3 * dense_s)
            other = 0.0
        meta = {**runtime.key(), "batch": batch, "measured_dense": dense_s, "call_overhead": overhead,
                "fused_activations": len(activations), "fused_residuals": len(residuals), "build_seconds": time.perf_counter() - start}
        return cls(layers, other, meta, links.inputs, statistics.median(rates) if rates else 0.0)

    def covers(self, channel_grid: Mapping[str, tuple[Sequence[int], Sequence[int]]]) -> bool:
        """Whether the table was built for every (kept in, kept out) count of ``channel_grid`` (:func:`level_widths`):
        timed, or asked for and left out by the build's time limit (timing again would leave it out again)."""
        asked = self.meta.get("channel_grid", {})
        for name, (ins, outs) in channel_grid.items():
            grid = self.layers[name]
            kept_in, kept_out = [set(axis) for axis in asked.get(name, ((), ()))]
            if not (set(outs) <= set(grid.kept_out) | kept_out and set(outs if grid.depthwise else ins) <= set(grid.kept_in) | kept_in):
                return False
        return True

    def layer_time(self, name: str, kept_in: int, kept_out: int) -> float:
        """Interpolated seconds of layer `name` keeping (kept_in, kept_out) channels."""
        return self.layers[name].time(kept_in, kept_out)

    def predict(self, kept: Mapping[str, tuple[int, int]]) -> float:
        """Predicted seconds of one forward pass when layer `name` keeps kept[name] = (in, out) channels; layers not named stay dense."""
        unknown = sorted(set(kept) - set(self.layers))
        if unknown:
            raise KeyError(f"layers not in the latency table: {unknown}")
        times, activations = [], 0
        for name, grid in self.layers.items():
            kin, kout = kept.get(name, (grid.kept_in[-1], grid.kept_out[-1]))
            times.append(grid.time(kin, kout))
            activations += kout * grid.out_hw[0] * grid.out_hw[1]
        # fsum: exactly rounded, so the order of the layers (a reloaded table's is sorted) cannot change a prediction
        return (math.fsum(times) + self.other * (activations / self._dense_activations)
                + (self.reorders(kept) - self._dense_reorders))

    @property
    def dense(self) -> float:
        """Predicted seconds of the dense model: its measured latency at build time (up to rounding)."""
        return self.predict({})

    def to_json(self) -> dict:
        """A JSON-serialisable dict; :meth:`from_json` reads it back with bit-identical predictions.

        Schema: ``{"format": "rdprune-latency/1", "other": seconds, "meta": {...}, "layers": {name: {"kept_in": [...],
        "kept_out": [...], "times": [[seconds per kept_out] per kept_in] (depthwise: [seconds]), "out_hw": [h, w],
        "depthwise": bool, "layout": like times (optional)}}, "links": {name: [[layer read from, h, w], ...]}
        (optional), "reorder_s": seconds (optional)}``, layers in call order.
        """
        layers = {name: {"kept_in": list(g.kept_in), "kept_out": list(g.kept_out), "times": g.times.tolist(),
                         "out_hw": list(g.out_hw), "depthwise": g.depthwise,
                         **({} if g.layout is None else {"layout": g.layout.tolist()})} for name, g in self.layers.items()}
        data = {"format": JSON_FORMAT, "other": self.other, "meta": dict(self.meta), "layers": layers}
        if self.links:
            data.update(links={name: [list(link) for link in links] for name, links in self.links.items()}, reorder_s=self.reorder_s)
        return data

    @classmethod
    def from_json(cls, data: dict) -> LatencyTable:
        """The table written by :meth:`to_json` (or hand-written to that schema)."""
        if data.get("format") != JSON_FORMAT:
            raise ValueError(f"not a latency table of format {JSON_FORMAT!r}: {data.get('format')!r}")
        layers = {name: LayerGrid(g["kept_in"], g["kept_out"], g["times"], g.get("out_hw", (1, 1)), g.get("depthwise", False),
                                  g.get("layout")) for name, g in data["layers"].items()}
        return cls(layers, data["other"], data.get("meta"), data.get("links"), data.get("reorder_s", 0.0))


class _PieceClock:
    """Forward hooks that split one forward pass into pieces: each tabulated layer, and what runs between them.

    The hooks stay registered but do nothing while ``enabled`` is false, so plain passes cost them two no-op
    Python calls per layer (microseconds, absorbed by the dense pass's common factor).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.enabled = False
        self.marks: list[tuple[float, str]] = []
        modules = dict(model.named_modules())
        self.handles = [hook for name in names for hook in (modules[name].register_forward_pre_hook(functools.partial(self._mark, name)),
                                                            modules[name].register_forward_hook(functools.partial(self._mark, name)))]

    def _mark(self, name: str, *_: object) -> None:
        if self.enabled:
            self.sync()
            self.marks.append((time.perf_counter(), name))

    def pieces(self, forward: Callable[[], object]) -> list[tuple[str | None, float]]:
        """(layer name, or None between layers; seconds) of each piece of one call of `forward`, in order."""
        self.marks.clear()
        self.enabled = True
        try:
            self._mark("")
            forward()
            self._mark("")
        finally:
            self.enabled = False
        times = [t for t, _ in self.marks]
        return [(self.marks[k][1] if k % 2 else None, times[k + 1] - times[k]) for k in range(len(times) - 1)]

    def remove(self) -> None:
        for hook in self.handles:
            hook.remove()


def _dense_pass(model: nn.Module, example: torch.Tensor, names: Sequence[str], device: torch.device,
                time_limit_s: float) -> tuple[dict[str, float], float]:
    """Seconds of each layer inside the dense model, and of the rest, summing to the model's median latency.

    Each round times one plain and one hooked forward pass (in alternating order). Every piece's median over
    the rounds is taken; all pieces are then scaled by one common factor, the plain pass's median over the
    sum of the piece medians (it absorbs the hooks' own cost and the load that long calls see, see the module
    docstring). A layer called twice gets the sum of its pieces.
    """
    plain = functools.partial(model, example)
    clock = _PieceClock(model, names, device)
    try:
        t0 = time.perf_counter()
        clock.pieces(plain)  # warms up, and prices a round
        round_s = 2 * (time.perf_counter() - t0)
        repeats = int(min(_DENSE_REPEATS, max(_DENSE_MIN_REPEATS, _DENSE_SHARE * time_limit_s / round_s - _DENSE_WARMUP)))
        plain_times, hooked = [], []
        for r in range(_DENSE_WARMUP + repeats):
            for use_hooks in ((True, False) if r % 2 else (False, True)):
                if use_hooks:
                    hooked.append(clock.pieces(plain))
                else:
                    plain_times.append(interleaved_samples([plain], 1, 0, device)[0][0])
    finally:
        clock.remove()
    hooked, plain_times = hooked[_DENSE_WARMUP:], plain_times[_DENSE_WARMUP:]
    medians = [statistics.median(run[k][1] for run in hooked) for k in range(len(hooked[0]))]
    scale = statistics.median(plain_times) / sum(medians)
    inside = dict.fromkeys(names, 0.0)
    other = 0.0
    for (name, _), seconds in zip(hooked[0], medians):
        if name is None:
            other += scale * seconds
        else:
            inside[name] += scale * seconds
    silent = sorted(name for name in names if name not in {n for n, _ in hooked[0]})
    if silent:
        raise ValueError(f"layers in shapes that the forward pass of the example does not call: {silent}")
    return inside, other


def _grid_pass(shapes: Sequence[LayerShape], full: Sequence[tuple[tuple[int, ...], ...]], dense_times: Sequence[float], batch: int,
               device: torch.device, points: int, budget_s: float, progress: bool,
               makers: Sequence[Callable[..., list[Callable]] | None] | None = None,
               ) -> list[tuple[tuple[tuple[int, ...], ...], GridTimes]]:
    """Time each layer's grid (:class:`GridTimes`), coarsening the rest when the estimate exceeds the budget.

    The estimate (:func:`_grid_cost`) is corrected as it goes by the ratio of time spent to time estimated so
    far.
    """
    start, spent_estimate, current = time.perf_counter(), 0.0, points
    out = []
    for k, (shape, grid_full, dense_time) in enumerate(tqdm(list(zip(shapes, full, dense_times)), desc="latency table",
                                                             disable=not progress, leave=False, dynamic_ncols=True)):
        elapsed = time.perf_counter() - start
        correction = elapsed / spent_estimate if spent_estimate > 0 else 1.0
        pending = list(zip(full[k:], dense_times[k:]))
        p = _plan_points(pending, current, (budget_s - elapsed) / correction)
        if p < current:
            log.warning("latency table: %d of %d layers left and %.1f s of the time limit; coarsening their grids to %d points per axis",
                        len(pending), len(shapes), budget_s - elapsed, p)
            current = p
        grid = _coarse_grid(grid_full, current)
        timed = _time_grid(shape, grid, batch, device, None if makers is None else makers[k])
        spent_estimate += _grid_cost(grid, dense_time)
        out.append((grid, timed))
    return out
