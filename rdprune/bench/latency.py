"""Benchmark ``python -m rdprune.bench latency``: RD channel pruning to a measured latency budget.

Two parts, both on one CPU thread by default:

1. Channel curves against the plain loop: a CIFAR ResNet-20 (projection shortcuts, random
   weights, 1x28x28 inputs), every channel group's curve by :func:`estimate_channel_curves` and by
   the definition run literally, timed interleaved in this process; prints the ratio and the
   largest difference relative to the curve's scale (goal: >= 2x, within 1e-6).
2. torchvision ResNet-50 (random weights: the benchmark is about speed) at each batch size: the
   latency table, channel curves on ``--levels`` levels and ``--inputs`` synthetic inputs (computed
   once, shared by the batch sizes), the allocation at ``--keep`` x the dense latency, then dense
   and the physically smaller model timed interleaved. Prints ``speedup N.NNx``, the latency
   model's error before any correction, and the seconds spent on table, curves and allocation.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torchvision.models import resnet50

from rdprune.bench.report import compare_line, interleaved, machine_line
from rdprune.core.curves import synthetic_inputs
from rdprune.core.timing import layer_shapes, measure_latency
from rdprune.granularity.channel.allocation import allocate_channels, meet_measured_latency
from rdprune.granularity.channel.costs import ChannelCost
from rdprune.granularity.channel.curves import estimate_channel_curves, group_plan, plain_channel_curves
from rdprune.granularity.channel.export import remove_channels
from rdprune.granularity.channel.latency import LatencyTable
from rdprune.granularity.channel.space import ChannelSpace
from rdprune.models.cifar_resnet import resnet20


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


def resnet50_at_budget(batches: list[int], levels: int, inputs: int, keep: float, threads: int, time_limit: float,
                       repeats: int, rounds: int) -> None:
    """Part 2: ResNet-50 pruned by RD over channel groups to ``keep`` x its measured latency."""
    torch.manual_seed(0)
    model = resnet50().eval()
    calibration = synthetic_inputs(inputs, (3, 224, 224))
    space = ChannelSpace(model, calibration[:1])
    start = time.perf_counter()
    curves = estimate_channel_curves(model, space, calibration, levels, batch_size=inputs, progress=False)
    curve_s = time.perf_counter() - start
    plans = {g: group_plan(space, g, levels, "relative") for g in space.groups}
    print(f"\nResNet-50, {len(space.groups)} channel groups; curves: {levels} levels, {inputs} synthetic inputs, {curve_s:.1f} s")
    for batch in batches:
        example = torch.randn(batch, 3, 224, 224)
        start = time.perf_counter()
        table = LatencyTable.build(model, example, layer_shapes(model, example), threads=threads, time_limit_s=time_limit)
        table_s = time.perf_counter() - start
        cost = ChannelCost(space, "latency", latency=table)
        allocation_s = []

        def solve(limit: float) -> dict[str, int]:
            begin = time.perf_counter()
            removal = allocate_channels(curves, plans, cost, limit).choice
            allocation_s.append(time.perf_counter() - begin)
            return removal

        def measure(removal: dict[str, int]) -> tuple[float, float]:
            smaller = remove_channels(copy.deepcopy(model), example[:1], space.removed_indices(removal))
            dense_s, pruned_s = measure_latency([model, smaller], example, repeats=repeats, threads=threads)
            return dense_s, pruned_s

        checked = meet_measured_latency(solve, measure, cost, cost.dense, keep, rounds)
        print(f"batch {batch}: dense {1e3 * checked.dense_s:.1f} ms, pruned {1e3 * checked.pruned_s:.1f} ms "
              f"(budget {1e3 * keep * checked.dense_s:.1f} ms): speedup {checked.speedup:.2f}x")
        print(f"  latency model before correction: predicted {1e3 * checked.predicted_s:.1f} ms of {1e3 * checked.predicted_dense_s:.1f}, "
              f"measured {1e3 * checked.first_s:.1f} ms of {1e3 * checked.first_dense_s:.1f}: error of the fraction of dense "
              f"{100 * checked.model_error:+.1f} %, of the seconds {100 * checked.absolute_error:+.1f} %; "
              f"corrections: {checked.corrections}")
        print(f"  time: latency table {table_s:.1f} s, curves {curve_s:.1f} s (shared), allocation "
              f"{sum(allocation_s):.2f} s over {len(allocation_s)} solve(s)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdprune.bench latency", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--levels", type=int, default=11)
    parser.add_argument("--inputs", type=int, default=16, help="synthetic calibration inputs for the ResNet-50 curves")
    parser.add_argument("--keep", type=float, default=0.5, help="latency budget as a fraction of the dense latency")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=300.0, help="cap on building each latency table (s)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per model")
    parser.add_argument("--rounds", type=int, default=3, help="latency corrections at most")
    parser.add_argument("--curve-repeats", type=int, default=3, help="interleaved repeats of the ResNet-20 curve comparison")
    parser.add_argument("--skip-resnet50", action="store_true", help="only the ResNet-20 curve comparison")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    curves_against_plain(args.curve_repeats, args.levels)
    if not args.skip_resnet50:
        resnet50_at_budget(args.batches, args.levels, args.inputs, args.keep, args.threads, args.time_limit, args.repeats,
                           args.rounds)
    return 0
