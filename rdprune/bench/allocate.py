"""Benchmark the allocation solver: ``python -m rdprune.bench allocate [--seed N] [--repeats R]``.

(1) CIFAR ResNet-32 sizes, 11 levels, targets 0.5, 0.7 and 0.9: :func:`allocate` against the plain exact DP
:func:`exact_dp_allocate` in the same run (times, ratio, both objectives).
(2) ResNet-50 sizes, 101 levels, targets 0.5 and 0.9, weights and FLOPs budgets, ordinary curves:
time and peak traced memory of :func:`allocate`.
(3) The same with worst-case curves, plateaus everywhere (:func:`plateau_curves`): staircases,
long runs of zero distortion and a mixture, targets 0.5, 0.7 and 0.9, with search-state counts.
Every time is the median and min-max of ``R >= 3`` repetitions, interleaved across the solvers and
cases of a section so that machine drift hits them alike; peak memory comes from one separate
traced run. The header names the machine, the thread counts and the git commit.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rdprune.core.allocation import allocate, allocate_with_stats, exact_dp_allocate
from rdprune.core.grid import Curve

RESNET32_TARGETS = (0.5, 0.7, 0.9)
"""The exact DP's work grows with the budget (surviving weights), so its time falls as the target rises."""
PLATEAU_KINDS = ("staircase", "zero runs", "mixed")


def resnet32_sizes() -> dict[str, int]:
    """Weight counts of CIFAR ResNet-32's convolutions and classifier (no shortcut convs)."""
    sizes = {"conv1": 3 * 16 * 9}
    c_in = 16
    for stage, width in enumerate((16, 32, 64), start=1):
        for block in range(5):
            for conv in (1, 2):
                sizes[f"layer{stage}.{block}.conv{conv}"] = c_in * width * 9
                c_in = width
    sizes["fc"] = 64 * 10
    return sizes


def resnet50_layers() -> tuple[dict[str, int], dict[str, int]]:
    """Weight counts and dense FLOPs (224x224 input) of torchvision ResNet-50's prunable layers.

    Computed from the architecture, in declaration order; equal to ``prunable_layers`` and
    ``layer_flops`` on ``torchvision.models.resnet50()`` (FLOPs = 2 x multiply-adds), without the
    model's construction and forward pass.
    """
    sizes, flops = {"conv1": 3 * 64 * 49}, {"conv1": 2 * 3 * 64 * 49 * 112 * 112}
    c_in, side = 64, 56
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for block in range(blocks):
            out = side // 2 if block == 0 and stage > 1 else side  # the 3x3 conv strides
            convs = [("conv1", c_in * width, side), ("conv2", width * width * 9, out), ("conv3", width * 4 * width, out)]
            if block == 0:
                convs.append(("downsample.0", c_in * 4 * width, out))
            for conv, n, s in convs:
                sizes[f"layer{stage}.{block}.{conv}"], flops[f"layer{stage}.{block}.{conv}"] = n, 2 * n * s * s
            c_in, side = 4 * width, out
    sizes["fc"], flops["fc"] = 2048 * 1000, 2 * 2048 * 1000
    return sizes, flops


def synthetic_curves(sizes: dict[str, int], levels: int, rng: np.random.Generator) -> dict[str, Curve]:
    """Convex-ish curves ``c * a^p`` with noise; every fifth layer noisy and dipping (worst-case-like)."""
    amounts = np.linspace(0.0, 1.0, levels)
    curves = {}
    for i, name in enumerate(sizes):
        scale = rng.uniform(0.2, 5.0) / np.sqrt(sizes[name])
        d = scale * amounts ** rng.uniform(1.5, 4.0) * rng.lognormal(0.0, 0.05, levels)
        if i % 5 == 4:
            d = d * rng.uniform(0.5, 1.5, levels)
        d[0] = 0.0
        curves[name] = Curve(amounts, d)
    return curves


def plateau_curves(sizes: dict[str, int], levels: int, rng: np.random.Generator, kind: str) -> dict[str, Curve]:
    """Worst-case curves for the allocation: equal distortion over many levels in every layer.

    ``staircase``: ``c * a^p`` held constant over stairs of 10-40 levels (before plateau handling,
    the exact search took over 20 s on these). ``zero runs``: exactly zero up to 10-50 % of the
    weights, then ``c * (a - a_z)^p``. ``mixed``: the layers take turns among staircase, zero run,
    smooth and noisy dipping (plateaus after the running max). Each curve is 0 at amount 0.
    """
    if kind not in PLATEAU_KINDS:
        raise ValueError(f"kind must be one of {PLATEAU_KINDS}, got {kind!r}")
    amounts = np.linspace(0.0, 1.0, levels)
    index = np.arange(levels)
    curves = {}
    for i, name in enumerate(sizes):
        shape = kind if kind != "mixed" else ("staircase", "zero runs", "smooth", "dipping")[i % 4]
        scale, power = rng.uniform(0.2, 5.0) / np.sqrt(sizes[name]), rng.uniform(1.5, 4.0)
        if shape == "staircase":
            width = int(rng.integers(10, 41))
            d = scale * amounts[(index // width) * width] ** power
        elif shape == "zero runs":
            z = int(rng.integers(levels // 10, levels // 2 + 1))
            d = scale * np.clip(amounts - amounts[z], 0.0, None) ** power
        elif shape == "smooth":
            d = scale * amounts**power
        else:
            d = scale * amounts**power * rng.uniform(0.3, 1.7, levels)
        d[0] = 0.0
        curves[name] = Curve(amounts, d)
    return curves


def objective(curves: dict[str, Curve], amounts: dict[str, float]) -> float:
    """Summed running-max distortion of a solution (the quantity both solvers minimise)."""
    total = 0.0
    for name, amount in amounts.items():
        c = curves[name]
        total += float(np.maximum.accumulate(c.distortion)[np.searchsorted(c.amounts, amount)])
    return total


def interleaved_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each callable, ``repeats`` rounds, each round calling every one in turn."""
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def spread(times: list[float]) -> str:
    """``median (min-max) ms`` of a list of seconds."""
    return f"{statistics.median(times) * 1e3:.1f} ms ({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})"


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes traced by ``tracemalloc`` during one call of ``fn``."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def git_commit() -> str | None:
    """Short hash of the checkout this module runs from (with ``+dirty`` for local changes), or ``None`` outside git."""
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def machine() -> str:
    """One line: CPU, core count, torch threads, numpy version and git commit."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"CPU: {cpu}; cores: {os.cpu_count()}; torch threads: {torch.get_num_threads()}; "
        f"numpy {np.__version__} (the solver does no BLAS work); git commit: {git_commit() or 'unknown (not a git checkout)'}"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdprune.bench allocate", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic curves (default 0)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per measurement, at least 3 (default 5)")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    rng = np.random.default_rng(args.seed)
    print(machine())
    print(f"times: median (min-max) of {args.repeats} interleaved repetitions; memory: peak traced by tracemalloc in one run")

    sizes = resnet32_sizes()
    curves = synthetic_curves(sizes, 11, rng)
    print(f"[1] ResNet-32 ({len(sizes)} layers, {sum(sizes.values())} weights, 11 levels): allocate vs the plain exact DP")
    for target in RESNET32_TARGETS:
        fast, plain = allocate(curves, sizes, target), exact_dp_allocate(curves, sizes, target)
        times = interleaved_times(
            {"allocate": lambda: allocate(curves, sizes, target), "exact DP": lambda: exact_dp_allocate(curves, sizes, target)},
            args.repeats,
        )
        o_fast, o_plain = objective(curves, fast), objective(curves, plain)
        ratio = statistics.median(times["exact DP"]) / statistics.median(times["allocate"])
        print(
            f"    target {target}: allocate {spread(times['allocate'])}, exact DP {spread(times['exact DP'])}, "
            f"ratio of medians {ratio:.0f}x; objectives {o_fast:.12g} vs {o_plain:.12g} (difference {abs(o_fast - o_plain):.3g})"
        )
        if abs(o_fast - o_plain) > 1e-12 * max(1.0, abs(o_plain)):
            print("ERROR: objectives differ")
            return 1

    sizes, flops = resnet50_layers()
    worst = 0.0
    sections = [("[2]", "ordinary curves", {"ordinary": synthetic_curves(sizes, 101, rng)}, (0.5, 0.9))]
    sections.append(("[3]", "plateau curves (worst case)", {k: plateau_curves(sizes, 101, rng, k) for k in PLATEAU_KINDS}, (0.5, 0.7, 0.9)))
    for label, title, families, targets in sections:
        print(f"{label} ResNet-50 ({len(sizes)} layers, {sum(sizes.values())} weights, 101 levels), {title}:")
        cases = [(kind, budget, target) for kind in families for budget in ("weights", "flops") for target in targets]
        runs = {case: (lambda c=case: allocate(families[c[0]], sizes, c[2], budget=c[1], flops=flops)) for case in cases}
        times = interleaved_times(runs, args.repeats)
        for kind, budget, target in cases:
            curves = families[kind]
            amounts, stats = allocate_with_stats(curves, sizes, target, budget=budget, flops=flops)
            peak = peak_memory(runs[kind, budget, target])
            worst = max(worst, statistics.median(times[kind, budget, target]))
            print(
                f"    {kind:9s} budget={budget:7s} target={target}: {spread(times[kind, budget, target])}, peak {peak / 2**20:5.1f} MiB, "
                f"states {stats.states} (peak step {stats.peak}), tie intervals {stats.tie_intervals}, "
                f"objective {objective(curves, amounts):.6g}, cost used {stats.used} of {stats.budget}"
            )
    print(f"    slowest ResNet-50 case (median): {worst * 1e3:.1f} ms (goal < 1000 ms, < 200 MB)")
    return 0
