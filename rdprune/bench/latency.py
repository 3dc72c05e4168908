"""Benchmark ``python -m rdprune.bench latency``: RD channel pruning to a measured latency budget.

Two parts, both on one CPU thread by default:

1. Channel curves against the plain loop: a CIFAR ResNet-20 (projection shortcuts, random
   weights, 1x28x28 inputs), every channel group's curve by :func:`estimate_channel_curves` and by
   the definition run literally, timed interleaved in this process; prints the ratio and the
   largest difference relative to the curve's scale (goal: >= 2x, within 1e-6).
2. torchvision ResNet-50 (random weights: the benchmark is about speed) in each ``--runtime`` (torch,
   onnxruntime) at each ``--batch``: the latency table, channel curves on ``--levels`` levels and
   ``--inputs`` synthetic inputs (computed once, shared), the allocation at ``--keep`` x the dense
   latency (RD, and ``--methods`` baselines), then dense and the physically smaller model timed
   interleaved in the runtime. Prints ``speedup N.NNx``, the predicted and measured fraction of the
   dense latency before any correction, the corrections, and per runtime and batch the median and
   range over ``--runs`` repetitions. The latency table is timed at the channel counts the levels give
   (``--grid levels``, as runs do by default) or at evenly spaced counts (``--grid even``), or
   both in turn within each run (``--grid levels even``);
   ``--profile`` adds, in ONNX Runtime, the time per node type of the dense and the pruned model.
3. ``--steps`` (alone): one 3x3 convolution timed by itself in each runtime at output counts around
   and between multiples of 8, reading 56, 60 or 64 channels.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
from torchvision.models import resnet50

from rdprune.bench.report import compare_line, interleaved, machine_line
from rdprune.core.curves import synthetic_inputs
from rdprune.core.runtimes import make_runtime
from rdprune.core.timing import LayerShape, layer_shapes
from rdprune.granularity.channel.allocation import allocate_channels, meet_measured_latency
from rdprune.granularity.channel.baselines import channel_baseline
from rdprune.granularity.channel.costs import ChannelCost
from rdprune.granularity.channel.curves import estimate_channel_curves, group_plan, plain_channel_curves
from rdprune.granularity.channel.export import remove_channels
from rdprune.granularity.channel.latency import LatencyTable, level_widths, torch_layer_calls
from rdprune.granularity.channel.space import ChannelSpace
from rdprune.models.cifar_resnet import resnet20
from rdprune.registry import RUNTIMES


def curves_against_plain(repeats: int, levels: int) -> None:
    """Part 1: the channel curve engine against the definition on ResNet-20, timed interleaved."""
    torch.manual_seed(0)
    model = resnet20(10, in_channels=1, shortcut="projection").eval()
    x = synthetic_inputs(64, (1, 28, 28))
    space = ChannelSpace(model, x[:1])
    timings = interleaved({
        "plain": lambda: plain_channel_curves(model, space, x, levels, batch_size=64),
        "fast": lambda: estimate_channel_curves(model, space, x, levels, batch_size=64, progress=False),
    }, repeats)
    fast, plain = timings["fast"][-1].result, timings["plain"][-1].result
    worst = max(float(np.abs(fast[g].distortion - plain[g].distortion).max() / max(np.abs(plain[g].distortion).max(), 1e-30))
                for g in space.groups)
    print(f"ResNet-20 (projection shortcuts), {len(space.groups)} channel groups, {levels} levels, 64 inputs 1x28x28:")
    print(compare_line("channel curves, rdprune vs plain loop", [t.wall for t in timings["plain"]], [t.wall for t in timings["fast"]]))
    print(f"largest difference from the plain loop: {worst:.1e} of the curve's scale (tolerance 1e-6)")


def width_steps(runtimes: list[str], threads: int, optimization: str, batch: int, repeats: int) -> None:
    """Part 3 (``--steps``): one ResNet-50 3x3 convolution (64 -> 64 channels on 56x56) alone in each runtime, at kept
    counts around and between multiples of 8: the steps a table interpolated between even counts misses."""
    shape = LayerShape("layer1.0.conv2", "conv2d", 64, 64, (3, 3), (1, 1), (1, 1), in_hw=(56, 56), out_hw=(56, 56))
    outs = [48, 52, 56, 57, 60, 63, 64]
    for name in runtimes:
        runtime = make_runtime(name, threads, "cpu", optimization)
        for kept_in in (56, 60, 64):
            calls = runtime.layer_calls(shape, batch, kept_in, outs, 1, True)
            if calls is None:  # torch: the table's own torch.nn.functional calls
                calls = torch_layer_calls(shape, batch, torch.device("cpu"), kept_in, outs, 1)
            times = runtime.medians(calls, repeats, 5)
            print(f"STEPS {runtime.describe()}, batch {batch}, 3x3 conv on 56x56 reading {kept_in} channels, ms by output "
                  "channels kept: " + ", ".join(f"{o}: {1e3 * t:.3f}" for o, t in zip(outs, times)), flush=True)


def _spread(values: list[float]) -> str:
    """Median and range of a list, for repetitions."""
    return f"median {statistics.median(values):.3g} (range {min(values):.3g} to {max(values):.3g}, {len(values)} run(s))"


def resnet50_at_budget(batches: list[int], levels: int, inputs: int, keep: float, threads: int, time_limit: float,
                       repeats: int, rounds: int, runtimes: list[str], optimization: str, runs: int, methods: list[str],
                       round_to: int, fit: bool = False, grids: tuple[str, ...] = ("levels",), profile: bool = False) -> None:
    """Part 2: ResNet-50 pruned by RD (and the baselines) over channel groups to ``keep`` x its measured latency, in each runtime.

    Per runtime and batch, ``runs`` repetitions of: the latency table, with ``fit`` its fit to the dense and a uniform
    model measured together (as a run does, ``latency.fit_to_measurement``), the allocation, the measurement (dense and the
    physically smaller model interleaved, ``repeats`` each, in the runtime) and the corrections. Prints each run, then
    the median and range of the speed-up, of the prediction error before correction and of the corrections.
    """
    torch.manual_seed(0)
    model = resnet50().eval()
    calibration = synthetic_inputs(inputs, (3, 224, 224))
    space = ChannelSpace(model, calibration[:1])
    start = time.perf_counter()
    curves = None
    if "rd" in methods:
        curves = estimate_channel_curves(model, space, calibration, levels, batch_size=inputs, progress=False, round_to=round_to)
    curve_s = time.perf_counter() - start
    plans = {g: group_plan(space, g, levels, "relative", round_to=round_to) for g in space.groups}
    print(f"\nResNet-50, {len(space.groups)} channel groups; curves: {levels} levels, {inputs} synthetic inputs, "
          f"round_to {round_to}, {curve_s:.1f} s")
    current = dict.fromkeys(space.groups, 0)
    for name in runtimes:
        runtime = make_runtime(name, threads, "cpu", optimization)
        for batch in batches:
            example = torch.randn(batch, 3, 224, 224)
            dense_call = runtime.model_call(model, example)
            stats: dict[str, dict[str, list[float]]] = {}
            for run in range(runs):
                for grid in grids:  # alternating, so that a change of load hits every grid alike
                    begin = time.perf_counter()
                    widths = level_widths(space, plans) if grid == "levels" else None
                    table = LatencyTable.build(model, example, layer_shapes(model, example), channel_grid=widths, time_limit_s=time_limit,
                                               runtime=runtime)
                    table_s = time.perf_counter() - begin
                    cost = ChannelCost(space, "latency", latency=table)

                    def measure(removal: dict[str, int]) -> tuple[float, float]:
                        smaller = remove_channels(copy.deepcopy(model), example[:1], space.removed_indices(removal))
                        dense_s, pruned_s = runtime.medians([dense_call, runtime.model_call(smaller, example)], repeats)
                        return dense_s, pruned_s

                    for method in methods:
                        allocation_s = []

                        def solve(limit: float, method: str = method) -> dict[str, int]:
                            begin = time.perf_counter()
                            if method == "rd":
                                removal = allocate_channels(curves, plans, cost, limit).choice
                            else:
                                removal = channel_baseline(method, space, cost, limit, current)
                            allocation_s.append(time.perf_counter() - begin)
                            return removal

                        reference = channel_baseline("unif", space, cost, keep * cost.dense, current) if fit else None
                        checked = meet_measured_latency(solve, measure, cost, cost.dense, keep, rounds if method == "rd" else 0,
                                                        reference)
                        if profile and run == 0 and hasattr(runtime, "op_times"):
                            final = remove_channels(copy.deepcopy(model), example[:1], space.removed_indices(checked.removal))
                            for label, m in (("dense", model), (f"{method} pruned", final)):
                                ops = sorted(runtime.op_times(m, example).items(), key=lambda kv: -kv[1])
                                print(f"PROFILE {name} batch {batch} {grid} grid {label}, ms per op type: "
                                      + ", ".join(f"{op} {1e3 * t:.2f}" for op, t in ops), flush=True)
                        reorders = table.reorders(space.kept_channels(checked.removal)) - table.reorders({})
                        row = stats.setdefault(f"{method}, {grid} grid", {"speedup": [], "error": [], "table_error": [],
                                                                          "corrections": [], "first_speedup": []})
                        row["speedup"].append(checked.speedup)
                        row["first_speedup"].append(checked.first_dense_s / checked.first_s)
                        row["error"].append(100 * checked.model_error)
                        row["table_error"].append(100 * checked.table_error)
                        row["corrections"].append(checked.corrections)
                        print(f"{runtime.describe()}, batch {batch}, run {run + 1}, {method}, {grid} grid: dense "
                              f"{1e3 * checked.dense_s:.1f} ms, "
                              f"pruned {1e3 * checked.pruned_s:.1f} ms (budget {1e3 * keep * checked.dense_s:.1f} ms): speedup "
                              f"{checked.speedup:.2f}x; predicted fraction {checked.predicted_s / checked.predicted_dense_s:.3f}, "
                              f"measured {checked.first_s / checked.first_dense_s:.3f} before correction: error "
                              f"{100 * checked.model_error:+.1f} % (the table alone: {100 * checked.table_error:+.1f} %; fit "
                              f"{1e3 * checked.offset_s:.2f} ms + {checked.scale:.3f} x table); corrections {checked.corrections}; "
                              f"reorders between layouts priced in the final model: {1e3 * reorders:+.2f} ms; "
                              f"latency table {table_s:.1f} s, "
                              f"allocation {sum(allocation_s):.2f} s", flush=True)
            for method, row in stats.items():
                print(f"SUMMARY {name} batch {batch} {method}: speedup {_spread(row['speedup'])}; first solution's speedup "
                      f"{_spread(row['first_speedup'])}; prediction error before correction (%) {_spread(row['error'])}; "
                      f"the table alone (%) {_spread(row['table_error'])}; "
                      f"corrections {_spread(row['corrections'])}", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdprune.bench latency", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", "--batches", dest="batches", type=int, nargs="+", default=[1, 8],
                        help="batch sizes of the ResNet-50 budget")
    parser.add_argument("--runtime", nargs="+", default=["torch"], choices=list(RUNTIMES.names()),
                        help="runtimes the latency is measured in (latency.runtime)")
    parser.add_argument("--optimization", default="all", help="ONNX Runtime graph optimisation level")
    parser.add_argument("--runs", type=int, default=1, help="repetitions of table, allocation and measurement")
    parser.add_argument("--methods", nargs="+", default=["rd"], choices=["rd", "unif", "glob"])
    parser.add_argument("--round-to", type=int, default=1, help="keep every group's width a multiple of this")
    parser.add_argument("--fit", action="store_true",
                        help="fit the latency model to the dense and a uniform model measured first (latency.fit_to_measurement)")
    parser.add_argument("--grid", nargs="+", choices=["levels", "even"], default=["levels"],
                        help="latency table timed at the counts the levels give (latency.grid levels), at evenly spaced counts "
                             "(even), or both in turn")
    parser.add_argument("--profile", action="store_true",
                        help="onnxruntime: after the first run, the time per node type of the dense and the pruned model")
    parser.add_argument("--steps", action="store_true",
                        help="only one 3x3 convolution alone, at output counts around multiples of 8, in each runtime")
    parser.add_argument("--levels", type=int, default=11)
    parser.add_argument("--inputs", type=int, default=16, help="synthetic calibration inputs for the ResNet-50 curves")
    parser.add_argument("--keep", type=float, default=0.5, help="latency budget as a fraction of the dense latency")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=300.0, help="cap on building each latency table (s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed forward passes per model (interleaved)")
    parser.add_argument("--rounds", type=int, default=3, help="latency corrections at most")
    parser.add_argument("--curve-repeats", type=int, default=3, help="interleaved repeats of the ResNet-20 curve comparison")
    parser.add_argument("--skip-resnet50", action="store_true", help="only the ResNet-20 curve comparison")
    parser.add_argument("--skip-curves", action="store_true", help="only the ResNet-50 budget (no ResNet-20 comparison)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    if args.steps:
        width_steps(args.runtime, args.threads, args.optimization, args.batches[0], args.repeats)
        return 0
    if not args.skip_curves:
        curves_against_plain(args.curve_repeats, args.levels)
    if not args.skip_resnet50:
        resnet50_at_budget(args.batches, args.levels, args.inputs, args.keep, args.threads, args.time_limit, args.repeats,
                           args.rounds, args.runtime, args.optimization, args.runs, args.methods, args.round_to, args.fit,
                           tuple(args.grid), args.profile)
    return 0
