"""Benchmark ``python -m rdprune.bench curves``: fast curve estimation against the plain loop.

CIFAR ResNet-32 with seeded random weights (BatchNorm statistics set from noise, eval mode),
64 calibration inputs of 3x32x32, the absolute grid with 11 levels. Both estimators run in the
same process on (a) the dense model and (b) the model after five rounds of 20 % global magnitude
pruning; it prints times, the speed-up, the largest difference relative to each layer's max|D|,
and peak memory. Exit 1 when any value is out of tolerance.

With ``--nproc N`` it instead times sharded curve estimation (:func:`rdprune.sharded_curves.sharded_curves`)
on the same two models under ``torchrun`` with 1 and then N ranks on this machine, one thread per
rank, and says whether the N-rank curves are identical to the 1-rank ones.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rdprune.core.curves import estimate_curves, plain_curves, synthetic_inputs
from rdprune.core.layers import prunable_layers
from rdprune.models.cifar_resnet import resnet32

TOLERANCE = 1e-6


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def benchmark_model(seed: int) -> nn.Module:
    """ResNet-32 with random weights and BatchNorm statistics of noise, so activations keep a sane scale."""
    torch.manual_seed(seed)
    model = resnet32()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # cumulative average: one pass sets the statistics of that pass
    model.train()
    with torch.no_grad():
        model(torch.randn(128, 3, 32, 32))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


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


def compare(model: nn.Module, inputs: torch.Tensor, levels: int, repeats: int, device: torch.device) -> bool:
    """Time both estimators on ``model``; print the figures; True when values agree.

    Wall time and process CPU time are both reported: other work on a shared machine inflates
    wall time at random, CPU time much less.
    """
    def timed(fn):
        best_wall, best_cpu, result = float("inf"), float("inf"), None
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best_wall = min(best_wall, time.perf_counter() - wall)
            best_cpu = min(best_cpu, time.process_time() - cpu)
        return best_wall, best_cpu, result, peak_memory_mb(device)

    fast_s, fast_cpu, fast, fast_mem = timed(lambda: estimate_curves(model, inputs, levels, grid="absolute", progress=False))
    plain_s, plain_cpu, plain, plain_mem = timed(lambda: plain_curves(model, inputs, levels, grid="absolute"))
    worst = 0.0
    for name, ref in plain.items():
        scale = float(np.abs(ref.distortion).max())
        diff = float(np.abs(fast[name].distortion - ref.distortion).max())
        worst = max(worst, diff / scale if scale > 0 else diff)
    layers = prunable_layers(model)
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    memory = "peak CUDA memory" if device.type == "cuda" else "peak RSS so far"
    print(f"  sparsity {zeros / sum(m.weight.numel() for m in layers.values()):.3f} over {len(layers)} layers")
    print(f"  estimate_curves {fast_s:8.2f} s wall {fast_cpu:8.2f} s CPU   {memory} {fast_mem:8.1f} MB")
    print(f"  plain_curves    {plain_s:8.2f} s wall {plain_cpu:8.2f} s CPU   {memory} {plain_mem:8.1f} MB")
    print(f"  speed-up        {plain_s / fast_s:8.2f} x wall {plain_cpu / fast_cpu:6.2f} x CPU")
    print(f"  max |difference| / max|D| over layers: {worst:.2e} (tolerance {TOLERANCE:.0e})")
    return worst <= TOLERANCE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rdprune.bench curves", description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, default=11, help="levels of the absolute grid (default 11)")
    parser.add_argument("--samples", type=int, default=64, help="calibration inputs (default 64)")
    parser.add_argument("--repeats", type=int, default=1, help="time each estimator this many times, keep the best")
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
        for case in ("dense", "pruned"):
            if case == "pruned":
                for _ in range(5):
                    global_magnitude_prune(model, 0.2)
            distributed.barrier()
            start = time.perf_counter()
            curves = sharded_curves(model, inputs, args.levels, grid="absolute", worst_case=False, skip=(),
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
    """Wall time of sharded curve estimation at 1 and ``--nproc`` ranks, and whether the curves are identical."""
    if args.nproc < 2:
        raise SystemExit(f"--nproc must be at least 2, got {args.nproc}")
    print(f"hardware: {cpu_model()}; {os.cpu_count()} cores; torch {torch.__version__}; one thread per rank")
    print(f"CIFAR ResNet-32, random weights, {args.samples} inputs of 3x32x32, absolute grid of {args.levels} levels, "
          "sharded_curves under torchrun (gloo, CPU); time from the first barrier to the last, start-up excluded")
    with tempfile.TemporaryDirectory() as tmp:
        one = launch_sharded(args, 1, Path(tmp) / "one.pt")
        many = launch_sharded(args, args.nproc, Path(tmp) / "many.pt")
    identical = within = True
    for case, label in (("dense", "(a) dense model"), ("pruned", "(b) after five rounds of 20 % global magnitude pruning")):
        (t1, c1), (tn, cn) = one[case], many[case]
        same = list(c1) == list(cn) and all(torch.equal(c1[n][0], cn[n][0]) and torch.equal(c1[n][1], cn[n][1]) for n in c1)
        worst = max(float((c1[n][1] - cn[n][1]).abs().max() / max(float(c1[n][1].abs().max()), 1e-300)) for n in c1)
        print(label)
        print(f"  {'1 rank':<14}{t1:8.2f} s wall")
        print(f"  {f'{args.nproc} ranks':<14}{tn:8.2f} s wall   speed-up {t1 / tn:5.2f} x")
        print(f"  curves identical: {'yes' if same else 'no'} (max |difference| / max|D| {worst:.2e})")
        identical = identical and same
        within = within and worst <= TOLERANCE
    print(f"curves at 1 and {args.nproc} ranks: " + ("identical" if identical else
          "within tolerance, not bit-identical" if within else "OUT OF TOLERANCE"))
    return 0 if within else 1


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.worker_out is not None:
        sharded_worker(args)
        return 0
    if args.nproc is not None:
        return compare_ranks(args)
    device = torch.device(args.device)
    print(f"hardware: {cpu_model()}; {os.cpu_count()} cores; torch {torch.__version__} with {torch.get_num_threads()} threads")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    model = benchmark_model(args.seed).to(device)
    inputs = synthetic_inputs(args.samples, (3, 32, 32), seed=args.seed + 1)
    print(f"CIFAR ResNet-32, random weights, {args.samples} inputs of 3x32x32, absolute grid of {args.levels} levels")
    print("(a) dense model")
    ok = compare(model, inputs, args.levels, args.repeats, device)
    for _ in range(5):
        global_magnitude_prune(model, 0.2)
    print("(b) after five rounds of 20 % global magnitude pruning")
    ok = compare(model, inputs, args.levels, args.repeats, device) and ok
    print("values within tolerance" if ok else "VALUES OUT OF TOLERANCE")
    return 0 if ok else 1
