"""Benchmark ``python -m rdprune.bench curves``: fast curve estimation against the plain loop.

CIFAR ResNet-32 with seeded random weights (BatchNorm statistics set from noise, eval mode),
64 calibration inputs of 3x32x32, the absolute grid with 11 levels. Both estimators run in the
same process on (a) the dense model and (b) the model after five rounds of 20 % global magnitude
pruning (67 % sparse). Each side runs ``--repeats`` times (at least 3 for a figure worth quoting),
interleaved (fast, plain, then plain, fast, ...); it prints each side's median wall and CPU time
with min-max, the plain/fast ratio per repetition pair (median and min-max), the largest
difference relative to each layer's max|D|, and the machine, thread count, torch version and
commit. Exit 1 when any value is out of tolerance.

``--profile`` instead prints, per layer, where the fast estimator's time goes: the layer's
suffix (share of the network's FLOPs and time), levels evaluated and free, time per evaluated
level, the overheads (boundary values, mask building, in-place guard, distortion), and the
bound that exact curves by suffix re-runs cannot beat (see :func:`profile`).

``--model resnet50`` (the default with ``--device cuda``) runs at ImageNet scale instead
(:func:`run_scale`): torchvision ResNet-50 with random weights (BatchNorm statistics from noise),
224x224, the published 256 calibration images in batches of ``--batch-size`` (64), the absolute
grid of 101 levels, all 54 layers. It times the plain loop on ``--plain-layers`` layers spread over
the network and scales it to all layers (every layer's plain cost is the same: levels x whole
forward passes), then one full curve set by the fast estimator, checks the sampled layers' curves
agree, and reports peak memory; on CUDA ``torch.cuda.max_memory_allocated``, and the peak of one
layer's curve on one batch against the whole calibration set (:func:`memory_by_set_size`: memory
must follow the batch size, not the set). ``--model small`` is the same run on CIFAR ResNet-20
with a few images: a smoke test of seconds on a CPU; ``--model deit_small`` runs timm's DeiT-S at
ImageNet scale, ``--model vit_small`` a 4-block DeiT-S-wide ViT at 32x32 (the transformer smoke test),
``--model hf_vit_small`` the same ViT from transformers, which fx cannot trace (module replay).
There, ``--profile`` first records the fast
estimator on the sampled layers (one calibration batch) with ``torch.profiler``
(:func:`profiler_run`): the operators that take the device's time, and how busy the device was
(kernel time over wall time); ``--trace FILE`` keeps the Chrome trace. ``--tf32`` sets TF32 for
cuDNN convolutions and matmuls (default: PyTorch's own settings, printed).

With ``--nproc N`` it instead times sharded curve estimation
(:func:`rdprune.distributed.sharded_curves.sharded_curves`) on the same two models under
``torchrun`` with 1 and then N ranks on this machine, one thread per rank, interleaved over the
repetitions, and says whether the N-rank curves are identical to the 1-rank ones.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rdprune.bench.report import interleaved, machine_line, pair_ratios, spread, time_call
from rdprune.core.curves import estimate_curves, layer_plan, plain_curves, synthetic_inputs
from rdprune.core.distortion import Distortion
from rdprune.core.layers import prunable_layers
from rdprune.core.masks import magnitude_mask, magnitude_order
from rdprune.core.suffix import TracedNetwork, tensor_version
from rdprune.models.cifar_resnet import resnet32
from rdprune.models.registry import build_model

TOLERANCE = 1e-6
MIN_QUOTABLE_REPEATS = 3
CASES = ("dense", "pruned")
CASE_LABELS = {"dense": "(a) dense model", "pruned": "(b) after five rounds of 20 % global magnitude pruning"}


def noise_statistics(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """Set BatchNorm statistics from one pass over ``batch`` (noise), so random-weight activations keep
    a sane scale; the model is returned in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # cumulative average: one pass sets the statistics of that pass
    model.train()
    with torch.no_grad():
        model(batch)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def benchmark_model(seed: int) -> nn.Module:
    """ResNet-32 with random weights and BatchNorm statistics of noise, so activations keep a sane scale."""
    torch.manual_seed(seed)
    return noise_statistics(resnet32(), torch.randn(128, 3, 32, 32))


@torch.no_grad()
def global_magnitude_prune(model: nn.Module, fraction: float) -> None:
    """Zero the ``fraction`` smallest-magnitude remaining weights across all prunable layers."""
    layers = list(prunable_layers(model).values())
    flat = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    zeros = int((flat == 0).sum())
    n_prune = zeros + round(fraction * (flat.numel() - zeros))
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:n_prune]] = False
    start = 0
    for m in layers:
        n = m.weight.numel()
        m.weight.mul_(keep[start:start + n].view_as(m.weight).to(m.weight.dtype))
        start += n


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def case_model(case: str, seed: int, device: torch.device) -> nn.Module:
    """The benchmark model of ``case``: dense, or after five rounds of 20 % global magnitude pruning."""
    model = benchmark_model(seed)
    if case == "pruned":
        for _ in range(5):
            global_magnitude_prune(model, 0.2)
    return model.to(device)


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _worst_difference(fast: dict, plain: dict) -> float:
    """Largest |fast - plain| over levels, relative to each layer's max|D|, over all layers."""
    worst = 0.0
    for name, ref in plain.items():
        scale = float(np.abs(ref.distortion).max())
        diff = float(np.abs(fast[name].distortion - ref.distortion).max())
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def compare(model: nn.Module, inputs: torch.Tensor, levels: int, repeats: int, device: torch.device) -> bool:
    """Time both estimators on ``model``, interleaved; print medians, spreads and ratios; True when values agree.

    Wall time and process CPU time are both reported: other work on a shared machine inflates
    wall time at random, CPU time much less. The ratio is taken per repetition pair (the fast
    and plain runs next to each other), so load that changes between pairs cancels.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sides = {
        "estimate_curves": lambda: estimate_curves(model, inputs, levels, grid="absolute", progress=False),
        "plain_curves": lambda: plain_curves(model, inputs, levels, grid="absolute"),
    }
    sync = _sync(device)

    def progress(i: int, side: str, t) -> None:
        print(f"    repetition {i + 1}: {side:<15} {t.wall:8.2f} s wall {t.cpu:8.2f} s CPU", flush=True)

    runs = interleaved(sides, repeats, before=sync, after=sync, on_run=progress)
    fast, plain = runs["estimate_curves"], runs["plain_curves"]
    worst = max(_worst_difference(f.result, p.result) for f in fast for p in plain)
    layers = prunable_layers(model)
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    memory = "peak CUDA memory" if device.type == "cuda" else "peak RSS of the process"
    print(f"  sparsity {zeros / sum(m.weight.numel() for m in layers.values()):.3f} over {len(layers)} layers; "
          f"{repeats} interleaved repetitions per side: median [min-max]")
    for label, runs_ in (("estimate_curves", fast), ("plain_curves", plain)):
        print(f"  {label:<15} wall {spread([t.wall for t in runs_]).format('s'):>24}   "
              f"CPU {spread([t.cpu for t in runs_]).format('s'):>24}")
    wall = spread(pair_ratios([t.wall for t in plain], [t.wall for t in fast]))
    cpu = spread(pair_ratios([t.cpu for t in plain], [t.cpu for t in fast]))
    print(f"  plain / fast per pair  wall {wall.format('x'):>22}   CPU {cpu.format('x'):>22}")
    exact = "bit-identical" if worst == 0 else f"{worst:.2e}"
    print(f"  max |difference| / max|D| over layers and repetitions: {exact} (tolerance {TOLERANCE:.0e}); "
          f"{memory} {peak_memory_mb(device):.0f} MB")
    if repeats < MIN_QUOTABLE_REPEATS:
        print(f"  (fewer than {MIN_QUOTABLE_REPEATS} repetitions: not a figure to quote)")
    return worst <= TOLERANCE


def _median_time(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def profile(model: nn.Module, inputs: torch.Tensor, levels: int, repeats: int, device: torch.device) -> dict:
    """Where :func:`estimate_curves`' time goes on ``model``, layer by layer (one calibration batch).

    Runs the fast estimator's steps (the same primitives, a timer around each) ``repeats`` times
    and keeps each figure's median; a whole forward pass of the model is timed next to each
    layer's steps, so the plain cost it is compared with saw the same load. Per layer: its sparsity; the levels evaluated (pruned count
    above the current zeros) out of the grid's levels, the rest being free; its suffix's share of
    the network's FLOPs and of its (traced, per-node) time; the time of one suffix re-run; the
    overheads per layer: boundary values from the shared forward walk, the prefix re-run that a
    per-layer boundary would cost instead, mask building (sort, clone, zeroing, weight copy), the
    in-place guard, the distortion; the plain loop's cost for the layer (every grid level: mask,
    whole forward pass); and ``bound`` = plain cost / (evaluated levels x suffix re-run).

    An exact curve needs, at every evaluated level, the network output with the layer pruned:
    pruning changes the layer's output at every position, so everything downstream of the layer
    (its suffix) must be recomputed, and nothing else need be. ``sum(plain) / (sum(k x suffix) +
    one forward pass)`` is then the most that re-running suffixes can gain over the plain loop.
    """
    model.eval()
    layers = prunable_layers(model)
    x = inputs.to(device)
    sync = _sync(device)

    def clock() -> float:
        if sync:
            sync()
        return time.perf_counter()

    network = TracedNetwork(model, layers.values())
    _median_time(lambda: model(x), 1, sync)  # warm-up
    node_times: dict = {}
    for _ in range(repeats):
        env = network.placeholder_values(x)
        for node in network.nodes:
            if node.op == "placeholder":
                continue
            start = clock()
            env[node] = network.execute(node, env)
            node_times.setdefault(node, []).append(clock() - start)
        del env
    node_time = {n: statistics.median(t) for n, t in node_times.items()}
    traced = sum(node_time.values())
    node_flops = network.node_flops(x[:1])
    total_flops = sum(node_flops.values())
    reference = model(x)

    plans = {n: network.plan(m) for n, m in layers.items()}
    grid = {n: layer_plan(n, m, levels, "absolute", None) for n, m in layers.items()}
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in layers}

    def note(name: str, key: str, seconds: float) -> None:
        samples[name].setdefault(key, []).append(seconds)

    for _ in range(repeats):
        walker = network.walker(x)
        for name, module in layers.items():
            plan, counts = plans[name], grid[name].to_run
            weight = module.weight
            start = clock()
            model(x)  # the plain loop's unit, timed next to this layer's steps so that load drift cancels
            note(name, "forward", clock() - start)
            start = clock()
            boundary = network.boundary_from(walker, plan) if plan.suffix else {}
            note(name, "boundary", clock() - start)
            start = clock()
            if plan.suffix:
                network.boundary_values(plan, x)
            note(name, "prefix", clock() - start)
            start = clock()
            original = weight.detach().clone()
            order = magnitude_order(original)
            work = original.flatten().clone()
            mask = clock() - start
            run = guard = distortion = 0.0
            try:
                done = 0
                for count in counts:
                    start = clock()
                    work[order[done:count]] = 0
                    done = count
                    weight.copy_(work.view_as(weight))
                    mask += clock() - start
                    start = clock()
                    versions = {n: tensor_version(v) for n, v in boundary.items()}
                    guard_before = clock() - start
                    start = clock()
                    out = network.run_suffix(plan, boundary, check=False) if plan.suffix else reference
                    run += clock() - start
                    start = clock()
                    _ = any(tensor_version(boundary[n]) != v for n, v in versions.items())
                    guard += guard_before + clock() - start
                    start = clock()
                    float(Distortion().batch(reference, out))
                    distortion += clock() - start
            finally:
                weight.copy_(original)
            note(name, "mask", mask)
            note(name, "run", run)
            note(name, "guard", guard)
            note(name, "distortion", distortion)
        del walker, boundary
    plain_mask = {}
    for name, module in layers.items():
        w = module.weight.detach()
        plain_mask[name] = _median_time(lambda: w.mul(magnitude_mask(w, w.numel() // 2)), repeats, sync)

    rows = []
    for name in layers:
        med = {k: statistics.median(v) for k, v in samples[name].items()}
        plan, lp = plans[name], grid[name]
        k, n_levels = len(lp.to_run), len(lp.amounts)
        per_level = med["run"] / k if k else 0.0
        plain = n_levels * (med["forward"] + plain_mask[name])
        irreducible = med["run"]
        rows.append({
            "layer": name, "sparsity": lp.zeros / layers[name].weight.numel(), "evaluated": k, "levels": n_levels,
            "suffix_flops": sum(node_flops[v] for v in plan.suffix) / total_flops,
            "suffix_time": sum(node_time.get(v, 0.0) for v in plan.suffix) / traced,
            "per_level": per_level, "boundary": med["boundary"], "prefix": med["prefix"], "mask": med["mask"],
            "guard": med["guard"], "distortion": med["distortion"], "plain": plain, "irreducible": irreducible,
        })
    forward = statistics.median(t for n in layers for t in samples[n]["forward"])
    return {"rows": rows, "forward": forward, "traced": traced}


def print_profile(result: dict, levels: int) -> None:
    rows, forward = result["rows"], result["forward"]
    ms = 1e3
    print(f"  one forward pass: model {forward:.3f} s, traced node by node {result['traced']:.3f} s; "
          f"times in ms unless marked, medians over the repetitions")
    print(f"  {'layer':<15}{'sparse':>7}{'eval/all':>9}{'sfx FLOP':>9}{'sfx time':>9}{'ms/level':>9}"
          f"{'bndry':>7}{'prefix':>7}{'mask':>6}{'guard':>7}{'dist':>6}{'plain s':>8}{'k*sfx s':>8}{'bound':>7}")
    for r in rows:
        bound = f"{r['plain'] / r['irreducible']:6.1f}x" if r["irreducible"] > 0 else "    inf"
        print(f"  {r['layer']:<15}{r['sparsity']:7.3f}{r['evaluated']:>5}/{r['levels']:<3}{r['suffix_flops']:9.3f}"
              f"{r['suffix_time']:9.3f}{r['per_level'] * ms:9.1f}{r['boundary'] * ms:7.1f}{r['prefix'] * ms:7.1f}"
              f"{r['mask'] * ms:6.1f}{r['guard'] * ms:7.3f}{r['distortion'] * ms:6.2f}{r['plain']:8.2f}"
              f"{r['irreducible']:8.2f} {bound}")
    plain = sum(r["plain"] for r in rows) + forward  # + the reference outputs
    runs = sum(r["irreducible"] for r in rows)
    over = {k: sum(r[k] for r in rows) for k in ("boundary", "prefix", "mask", "guard", "distortion")}
    fixed = 2 * forward  # reference outputs and the check that the trace reproduces the model
    fast = runs + over["boundary"] + over["mask"] + over["guard"] + over["distortion"] + fixed
    print(f"  plain loop: {len(rows)} layers x {levels} levels x (mask + forward pass) + reference = {plain:.2f} s")
    print(f"  fast, sum of its steps: suffix re-runs {runs:.2f} s + boundaries {over['boundary']:.2f} s + masks "
          f"{over['mask']:.2f} s + in-place guard {over['guard']:.4f} s + distortion {over['distortion']:.2f} s + "
          f"reference and trace check {fixed:.2f} s = {fast:.2f} s -> {plain / fast:.2f}x")
    print(f"  (boundaries by a prefix re-run per layer instead of one shared forward walk: {over['prefix']:.2f} s "
          f"-> {plain / (fast - over['boundary'] + over['prefix']):.2f}x)")
    bound = plain / (runs + forward)
    print(f"  bound for exact curves by suffix re-runs: plain / (sum of k x suffix + one forward) = "
          f"{plain:.2f} / {runs + forward:.2f} = {bound:.2f}x; 4x would need the suffix re-runs to take "
          f"{plain / 4 - forward:.2f} s")
    flop_plain = sum(r["levels"] for r in rows) + 1
    flop_fast = sum(r["evaluated"] * r["suffix_flops"] for r in rows) + 1
    print(f"  the same bound in FLOPs (sum of levels x network / (sum of k x suffix FLOPs + one network)): "
          f"{flop_plain / flop_fast:.2f}x; above it only through cheaper execution of the same FLOPs "
          f"(e.g. the suffix's ReLUs and sums writing into their argument instead of fresh memory)")
    stages: dict[str, list[dict]] = {}
    for r in rows:
        stages.setdefault(r["layer"].split(".")[0], []).append(r)
    print("  by stage:  layers  mean sparsity  evaluated levels  share of k x suffix  plain / (k x suffix)")
    for stage, rs in stages.items():
        irr = sum(r["irreducible"] for r in rs)
        print(f"  {stage:<10}{len(rs):>7}{statistics.mean(r['sparsity'] for r in rs):>15.3f}"
              f"{sum(r['evaluated'] for r in rs):>18}{irr / runs:>21.3f}"
              f"{(sum(r['plain'] for r in rs) / irr if irr else float('inf')):>21.2f}x")


@dataclass(frozen=True)
class ScaleModel:
    """A model of the ``--model`` scale run, with its defaults (the published settings for ResNet-50)."""

    label: str
    arch: str  # a name in rdprune's model registry (timm:<name> included)
    classes: int
    image_size: int
    samples: int
    batch_size: int
    levels: int
    kwargs: tuple[tuple[str, object], ...] = ()  # builder keywords (model.kwargs)


SCALE_MODELS = {
    "resnet50": ScaleModel("torchvision ResNet-50, random weights", "resnet50", 1000, 224, 256, 64, 101),
    "small": ScaleModel("CIFAR ResNet-20, random weights (smoke test)", "resnet20_cifar", 10, 32, 16, 8, 6),
    "deit_small": ScaleModel("timm DeiT-S, random weights", "timm:deit_small_patch16_224", 1000, 224, 256, 64, 101),
    "vit_small": ScaleModel("timm ViT, 4 blocks of DeiT-S width on 32x32, random weights (transformer smoke test)",
                            "timm:deit_small_patch16_224", 10, 32, 16, 8, 6, (("img_size", 32), ("patch_size", 8), ("depth", 4))),
    "hf_vit_small": ScaleModel("Hugging Face ViT, the vit_small shape, random weights (fx cannot trace it: module replay)",
                               "rdprune.bench.curves:hf_vit_small", 10, 32, 16, 8, 6),
}
MODELS = ("resnet32_cifar", *SCALE_MODELS)
MEMORY_SLACK = 1.1
"""The whole set's peak may exceed one batch's by this factor (allocator rounding, the set's outputs)."""


def hf_vit_small(num_classes: int, in_channels: int = 3) -> nn.Module:
    """A transformers ViT of ``vit_small``'s shape (4 blocks of DeiT-S width, 8x8 patches of 32x32), random weights."""
    import transformers

    from rdprune.models.hf_models import HFImageClassifier
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=in_channels, hidden_size=384, num_hidden_layers=4,
                                    num_attention_heads=6, intermediate_size=1536, num_labels=num_classes)
    return HFImageClassifier(transformers.ViTForImageClassification(config))


def scale_model(spec: ScaleModel, seed: int, device: torch.device) -> nn.Module:
    """``spec``'s model, seeded random weights, BatchNorm statistics from 32 noise images, on ``device``."""
    torch.manual_seed(seed)
    model = build_model(spec.arch, spec.classes, input_shape=(3, spec.image_size, spec.image_size), kwargs=dict(spec.kwargs)).to(device)
    return noise_statistics(model, torch.randn(32, 3, spec.image_size, spec.image_size, device=device))


def spread_layers(names: list[str], count: int) -> list[str]:
    """``count`` names evenly spread over ``names``, the first and the last included."""
    if count < 1:
        raise ValueError(f"the number of sampled layers must be >= 1, got {count}")
    if count >= len(names):
        return list(names)
    if count == 1:
        return names[:1]
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)]


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def set_tf32(mode: str) -> str:
    """Apply ``--tf32`` (on / off, or default: leave PyTorch's settings); describe what is in force."""
    if mode != "default":
        torch.backends.cudnn.allow_tf32 = mode == "on"
        torch.backends.cuda.matmul.allow_tf32 = mode == "on"
    conv = "TF32" if torch.backends.cudnn.allow_tf32 else "fp32"
    matmul = "TF32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return f"CUDA convolutions in {conv}, matmuls in {matmul} ({'PyTorch defaults' if mode == 'default' else f'--tf32 {mode}'})"


def plain_sample(model: nn.Module, inputs: torch.Tensor, levels: int, batch_size: int, sample: list[str],
                 device: torch.device) -> tuple[float, dict]:
    """Wall time and curves of the plain loop on the ``sample`` layers.

    The plain loop costs the same for every layer (each level runs the whole network on every
    batch), so this time, times layers / sampled layers, is its cost for all layers (each call
    also computes the reference outputs once: under 1 % at 101 levels).
    """
    sync = _sync(device)
    timed = time_call(lambda: plain_curves(model, inputs, levels, grid="absolute", layers=sample, batch_size=batch_size),
                      sync, sync)
    return timed.wall, timed.result


def fast_set(model: nn.Module, inputs: torch.Tensor, levels: int, batch_size: int, device: torch.device) -> tuple[float, float, dict]:
    """Wall time, peak memory (MB) and curves of :func:`estimate_curves` on every layer.

    ``inputs`` stay on the CPU: the estimator moves one calibration batch at a time to the model's device.
    """
    sync = _sync(device)
    _reset_peak(device)
    timed = time_call(lambda: estimate_curves(model, inputs, levels, grid="absolute", batch_size=batch_size, progress=False),
                      sync, sync)
    return timed.wall, peak_memory_mb(device), timed.result


def memory_by_set_size(model: nn.Module, inputs: torch.Tensor, batch_size: int, device: torch.device) -> tuple[float, float]:
    """Peak CUDA memory (MB) of the first layer's curve (the longest suffix) on one batch, then on all of ``inputs``."""
    first = next(iter(prunable_layers(model)))
    peaks = []
    for n in (min(batch_size, len(inputs)), len(inputs)):
        _reset_peak(device)
        estimate_curves(model, inputs[:n], 3, grid="absolute", layers=[first], batch_size=batch_size, progress=False)
        torch.cuda.synchronize(device)
        peaks.append(peak_memory_mb(device))
    return peaks[0], peaks[1]


def _device_time_us(event) -> float:
    """An averaged profiler event's own time on the device (the attribute's name changed across torch versions)."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def profiler_run(model: nn.Module, inputs: torch.Tensor, levels: int, layers: list[str], device: torch.device,
                 trace: str | None) -> dict:
    """:func:`estimate_curves` on ``layers`` and one calibration batch under ``torch.profiler``, after a warm-up.

    Returns the operator table (sorted by device time on CUDA, CPU time elsewhere), the wall time,
    and on CUDA the kernels' total time over the wall time: near 1 the GPU is the limit, well below
    it the host (Python, launches, synchronisation) keeps the GPU waiting.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as record

    cuda = device.type == "cuda"
    sync = _sync(device)

    def curves() -> None:
        estimate_curves(model, inputs, levels, grid="absolute", layers=layers, batch_size=len(inputs), progress=False)

    curves()  # warm-up: cuDNN's algorithm choice, the allocator's pool
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with record(activities=activities) as prof:
        timed = time_call(curves, sync, sync)
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    result = {"wall": timed.wall, "table": averages.table(sort_by=sort, row_limit=15), "busy": None}
    if cuda:
        result["busy"] = sum(_device_time_us(e) for e in averages) / 1e6 / timed.wall
    if trace:
        prof.export_chrome_trace(trace)
    return result


def run_scale(args: argparse.Namespace, device: torch.device) -> int:
    """The ``--model resnet50`` / ``small`` run; exit 1 when out of tolerance (or, on CUDA, memory grows with the set).

    Figures print as soon as they are measured, in the order profile (with ``--profile``), plain
    loop on the sample, full fast curve set, memory check, then one ``summary:`` line, so a run
    stopped by a time limit still reports what it measured.
    """
    spec = SCALE_MODELS[args.model]
    levels = args.levels or spec.levels
    samples = args.samples or spec.samples
    batch = args.batch_size or spec.batch_size
    model = scale_model(spec, args.seed, device)
    layers = list(prunable_layers(model))
    sample = spread_layers(layers, args.plain_layers)
    inputs = synthetic_inputs(samples, (3, spec.image_size, spec.image_size), seed=args.seed + 1)
    print(f"{spec.label}: {len(layers)} layers, {samples} calibration inputs of 3x{spec.image_size}x{spec.image_size} "
          f"in batches of {batch}, absolute grid of {levels} levels; one run of each side", flush=True)
    summary = {"model": args.model, "device": str(device), "layers": len(layers), "levels": levels, "samples": samples,
               "batch": batch}
    if args.profile:
        prof = profiler_run(model, inputs[:batch], levels, sample, device, args.trace)
        busy = f"; kernels busy {prof['busy']:.0%} of the wall time" if prof["busy"] is not None else ""
        print(f"  torch.profiler, estimate_curves on {', '.join(sample)} with one batch of {min(batch, samples)}: "
              f"{prof['wall']:.2f} s wall{busy}" + (f"; Chrome trace in {args.trace}" if args.trace else ""))
        print(prof["table"], flush=True)
        if prof["busy"] is not None:
            summary["gpu_busy"] = f"{prof['busy']:.2f}"
    plain_s, plain = plain_sample(model, inputs, levels, batch, sample, device)
    plain_scaled = plain_s * len(layers) / len(sample)
    print(f"  plain loop on {len(sample)} of {len(layers)} layers ({', '.join(sample)}): {plain_s:.2f} s; "
          f"scaled to all layers: {plain_scaled:.2f} s", flush=True)
    fast_s, peak, fast = fast_set(model, inputs, levels, batch, device)
    memory = "peak CUDA memory (max_memory_allocated)" if device.type == "cuda" else "peak RSS of the process"
    print(f"  estimate_curves, all {len(layers)} layers: {fast_s:.2f} s wall; {memory} {peak:.0f} MB; "
          f"plain / fast {plain_scaled / fast_s:.2f}x")
    worst = _worst_difference({n: fast[n] for n in sample}, plain)
    exact = "bit-identical" if worst == 0 else f"{worst:.2e}"
    print(f"  max |difference| / max|D| on the sampled layers: {exact} (tolerance {TOLERANCE:.0e})", flush=True)
    values_ok = worst <= TOLERANCE
    memory_ok = True
    summary.update(fast_s=f"{fast_s:.2f}", plain_scaled_s=f"{plain_scaled:.2f}", speedup=f"{plain_scaled / fast_s:.2f}",
                   peak_mb=f"{peak:.0f}")
    if device.type == "cuda":
        one, whole = memory_by_set_size(model, inputs, batch, device)
        memory_ok = whole <= MEMORY_SLACK * one
        print(f"  peak CUDA memory of {layers[0]}'s curve: {one:.0f} MB with {min(batch, samples)} images, {whole:.0f} MB "
              f"with {samples} in batches of {batch}: " + ("follows the batch size, not the set" if memory_ok else
                                                             "GROWS WITH THE SET"))
        print(f"  fits a 16 GB GPU: {'yes' if peak < 16 * 1024 else 'NO'}")
        summary.update(peak_one_batch_mb=f"{one:.0f}", peak_whole_set_mb=f"{whole:.0f}")
    summary["within_tolerance"] = "yes" if values_ok else "no"
    print("summary: " + " ".join(f"{k}={v}" for k, v in summary.items()))
    print("VALUES OUT OF TOLERANCE" if not values_ok else "MEMORY GROWS WITH THE SET" if not memory_ok else "values within tolerance")
    return 0 if values_ok and memory_ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rdprune.bench curves", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default=None,
                        help="resnet32_cifar: interleaved comparison on CIFAR ResNet-32 (default on CPU); resnet50: "
                             "ImageNet scale, one full curve set and a sampled plain loop (default on CUDA); small: "
                             "the resnet50 run on CIFAR ResNet-20, seconds on a CPU; deit_small: the resnet50 run on timm's "
                             "DeiT-S (timm extra); vit_small: the same on a 4-block DeiT-S-wide ViT at 32x32, a CPU smoke test; "
                             "hf_vit_small: that ViT from transformers (hf extra), which fx cannot trace")
    parser.add_argument("--levels", type=int, default=None, help="levels of the absolute grid (default 11; resnet50 101)")
    parser.add_argument("--samples", type=int, default=None,
                        help="calibration inputs (default 64, one batch; resnet50 256)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="calibration batch size of the scale run (default 64; small, vit_small 8)")
    parser.add_argument("--plain-layers", type=int, default=3,
                        help="scale runs: layers the plain loop is timed on, spread over the network (default 3)")
    parser.add_argument("--repeats", type=int, default=MIN_QUOTABLE_REPEATS,
                        help=f"resnet32_cifar: repetitions of each side, interleaved (default {MIN_QUOTABLE_REPEATS}; "
                             f"at least {MIN_QUOTABLE_REPEATS} for a figure to quote)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)} (default both)")
    parser.add_argument("--profile", action="store_true",
                        help="resnet32_cifar: where the fast estimator's time goes, per layer, instead of timing both "
                             "estimators; scale runs: also record the sampled layers' curves with torch.profiler")
    parser.add_argument("--trace", default=None, help="scale runs with --profile: write the Chrome trace to this file")
    parser.add_argument("--tf32", choices=("default", "on", "off"), default="default",
                        help="TF32 for CUDA convolutions and matmuls (default: PyTorch's own settings)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=None,
                        help="time sharded curve estimation under torchrun at 1 and NPROC ranks (CPU, one thread each)")
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)  # set for the ranks --nproc starts
    return parser


def sharded_worker(args: argparse.Namespace) -> None:
    """One rank of a ``--nproc`` launch: time sharded curves on both models; rank 0 saves curves and times."""
    from rdprune import distributed
    from rdprune.distributed.sharded_curves import sharded_curves

    torch.set_num_threads(1)
    with distributed.distributed_session("cpu") as info:
        model = benchmark_model(args.seed)
        inputs = synthetic_inputs(args.samples, (3, 32, 32), seed=args.seed + 1)
        results = {}
        for case in CASES:
            if case == "pruned":
                for _ in range(5):
                    global_magnitude_prune(model, 0.2)
            distributed.barrier()
            start = time.perf_counter()
            curves = sharded_curves(model, inputs, args.levels, grid="absolute", distortion=Distortion(), skip=(),
                                    batch_size=args.samples, cache_dir=None, dist=info, progress=False)
            distributed.barrier()
            results[case] = (time.perf_counter() - start, curves)
        if info.is_main:
            torch.save({case: (seconds, {n: (torch.from_numpy(c.amounts), torch.from_numpy(c.distortion))
                                         for n, c in curves.items()})
                        for case, (seconds, curves) in results.items()}, args.worker_out)


def launch_sharded(args: argparse.Namespace, nproc: int, out: Path) -> dict:
    """Run :func:`sharded_worker` on ``nproc`` local ranks under torchrun; rank 0's saved results."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "rdprune.bench", "curves", "--levels", str(args.levels), "--samples", str(args.samples),
           "--seed", str(args.seed), "--worker-out", str(out)]
    subprocess.run(cmd, env=env, check=True)
    return torch.load(out, weights_only=True)


def compare_ranks(args: argparse.Namespace) -> int:
    """Wall time of sharded curve estimation at 1 and ``--nproc`` ranks, interleaved over the
    repetitions, and whether the curves are identical."""
    if args.nproc < 2:
        raise SystemExit(f"--nproc must be at least 2, got {args.nproc}")
    print(machine_line(threads=1))
    print(f"CIFAR ResNet-32, random weights, {args.samples} inputs of 3x32x32, absolute grid of {args.levels} levels, "
          "sharded_curves under torchrun (gloo, CPU, one thread per rank); time from the first barrier to the last, "
          "start-up excluded; "
          f"{args.repeats} interleaved repetitions of each launch: median [min-max]")
    launches = {1: [], args.nproc: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for world in ((1, args.nproc) if i % 2 == 0 else (args.nproc, 1)):
                launches[world].append(launch_sharded(args, world, Path(tmp) / f"{world}-{i}.pt"))
    identical = within = True
    for case in CASES:
        ones, manys = [r[case] for r in launches[1]], [r[case] for r in launches[args.nproc]]
        c1 = ones[0][1]
        same = all(list(c1) == list(cn) and all(torch.equal(c1[n][0], cn[n][0]) and torch.equal(c1[n][1], cn[n][1]) for n in c1)
                   for _, cn in ones + manys)
        worst = max(float((c1[n][1] - cn[n][1]).abs().max() / max(float(c1[n][1].abs().max()), 1e-300))
                    for _, cn in manys for n in c1)
        t1, tn = [t for t, _ in ones], [t for t, _ in manys]
        print(CASE_LABELS[case])
        print(f"  {'1 rank':<14} wall {spread(t1).format('s'):>24}")
        print(f"  {f'{args.nproc} ranks':<14} wall {spread(tn).format('s'):>24}   speed-up per pair "
              f"{spread(pair_ratios(t1, tn)).format('x')}")
        print(f"  curves identical across ranks and repetitions: {'yes' if same else 'no'} "
              f"(max |difference| / max|D| {worst:.2e})")
        identical = identical and same
        within = within and worst <= TOLERANCE
    if args.repeats < MIN_QUOTABLE_REPEATS:
        print(f"(fewer than {MIN_QUOTABLE_REPEATS} repetitions: not figures to quote)")
    print(f"curves at 1 and {args.nproc} ranks: " + ("identical" if identical else
          "within tolerance, not bit-identical" if within else "OUT OF TOLERANCE"))
    return 0 if within else 1


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.worker_out is not None:
        sharded_worker(args)
        return 0
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    for name in ("levels", "samples", "batch_size", "plain_layers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here (torch.cuda.is_available() is False)")
    model = args.model or ("resnet50" if device.type == "cuda" and args.nproc is None else "resnet32_cifar")
    if model != "resnet32_cifar" and args.nproc is not None:
        raise SystemExit("--nproc times CIFAR ResNet-32 only; leave out --model")
    if model == "resnet32_cifar":
        args.levels, args.samples = args.levels or 11, args.samples or 64
    if args.nproc is not None:
        return compare_ranks(args)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or any(c not in CASES for c in cases):
        raise SystemExit(f"--cases must name some of {','.join(CASES)}, got {args.cases!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(machine_line())
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}; {set_tf32(args.tf32)}")
    if model != "resnet32_cifar":
        args.model = model
        return run_scale(args, device)
    inputs = synthetic_inputs(args.samples, (3, 32, 32), seed=args.seed + 1)
    print(f"CIFAR ResNet-32, random weights, {args.samples} inputs of 3x32x32, absolute grid of {args.levels} levels")
    ok = True
    for case in cases:
        model = case_model(case, args.seed, device)
        print(CASE_LABELS[case])
        if args.profile:
            print_profile(profile(model, inputs, args.levels, args.repeats, device), args.levels)
        else:
            ok = compare(model, inputs, args.levels, args.repeats, device) and ok
    if not args.profile:
        print("values within tolerance" if ok else "VALUES OUT OF TOLERANCE")
    return 0 if ok else 1
