"""Benchmark the allocation solver: ``python -m rdprune.bench allocate [--seed N]``.

(1) CIFAR ResNet-32 sizes, 11 levels, targets 0.5, 0.7 and 0.9: :func:`allocate` against the plain exact DP
:func:`exact_dp_allocate` in the same run (median times, ratio, both objectives).
(2) torchvision ResNet-50 sizes, 101 levels, targets 0.5 and 0.9, weights and FLOPs budgets:
time and peak traced memory of :func:`allocate`.
Curves are synthetic: ``d = c_l * a^p_l`` with multiplicative noise, a fifth of them noisy and
dipping like worst-case curves.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import tracemalloc

import numpy as np
import torch

from rdprune.core.allocation import _prepare, allocate, exact_dp_allocate
from rdprune.core.grid import Curve


RESNET32_TARGETS = (0.5, 0.7, 0.9)
"""The exact DP's work grows with the budget (surviving weights), so its time falls as the target rises."""


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
    """Weight counts and dense FLOPs (224x224 input) of torchvision ResNet-50's prunable layers."""
    from torchvision.models import resnet50

    from rdprune.core.layers import layer_flops, prunable_layers

    model = resnet50()
    layers = prunable_layers(model)
    return {n: m.weight.numel() for n, m in layers.items()}, layer_flops(model, layers, (3, 224, 224))


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


def objective(curves: dict[str, Curve], amounts: dict[str, float]) -> float:
    """Summed running-max distortion of a solution (the quantity both solvers minimise)."""
    total = 0.0
    for name, amount in amounts.items():
        c = curves[name]
        total += float(np.maximum.accumulate(c.distortion)[np.searchsorted(c.amounts, amount)])
    return total


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"CPU: {cpu}; cores: {os.cpu_count()}; torch threads: {torch.get_num_threads()}; "
        f"numpy {np.__version__} (single-threaded here: the solver does no BLAS work)"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdprune.bench allocate", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic curves (default 0)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(_hardware())

    sizes = resnet32_sizes()
    curves = synthetic_curves(sizes, 11, rng)
    print(f"[1] ResNet-32 ({len(sizes)} layers, {sum(sizes.values())} weights, 11 levels): allocate vs the plain exact DP")
    for target in RESNET32_TARGETS:
        fast = allocate(curves, sizes, target)
        plain = exact_dp_allocate(curves, sizes, target)
        t_fast = _median_time(lambda: allocate(curves, sizes, target), 50)
        t_plain = _median_time(lambda: exact_dp_allocate(curves, sizes, target), 3)
        o_fast, o_plain = objective(curves, fast), objective(curves, plain)
        print(
            f"    target {target}: allocate {t_fast * 1e3:.3f} ms, exact DP {t_plain * 1e3:.1f} ms, "
            f"ratio {t_plain / t_fast:.0f}x; objectives {o_fast:.12g} vs {o_plain:.12g} (difference {abs(o_fast - o_plain):.3g})"
        )
        if abs(o_fast - o_plain) > 1e-12 * max(1.0, abs(o_plain)):
            print("ERROR: objectives differ")
            return 1

    sizes, flops = resnet50_layers()
    curves = synthetic_curves(sizes, 101, rng)
    print(f"[2] ResNet-50 ({len(sizes)} layers, {sum(sizes.values())} weights, 101 levels):")
    worst = 0.0
    for budget in ("weights", "flops"):
        for target in (0.5, 0.9):
            kwargs = {"budget": budget, "flops": flops}
            t = _median_time(lambda: allocate(curves, sizes, target, **kwargs), 5)
            tracemalloc.start()
            amounts = allocate(curves, sizes, target, **kwargs)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            p = _prepare(curves, sizes, target, budget, flops, None, 0, 0)
            used = sum(int(p.cost[i, np.searchsorted(a, amounts[n])]) for i, (n, a) in enumerate(zip(p.names, p.amounts)))
            worst = max(worst, t)
            print(
                f"    budget={budget:7s} target={target}: {t * 1e3:7.1f} ms, peak {peak / 2**20:6.1f} MiB, "
                f"objective {objective(curves, amounts):.6g}, cost used {used} of {p.budget}"
            )
    print(f"    slowest ResNet-50 case: {worst * 1e3:.1f} ms (goal < 1000 ms, < 300 MB)")
    return 0
