"""Benchmark ``python -m rdprune.bench semi_structured``: end-to-end speed of 2:4 Linear layers chosen by RD.

On a CUDA GPU with 2:4 kernels (compute capability 8.0 or newer): a timm model (default
``deit_small_patch16_224``, random weights) in bf16 at ``--batch`` (64): dense, every candidate
Linear layer 2:4, and the half of the candidates that RD chooses (the ``layers`` budget at 0.5,
curves on ``--inputs`` random-noise calibration images, in fp32), timed interleaved. Prints each
model's ms, the speedups over dense, each 2:4 model's largest output difference from its masked
dense model in bf16 (relative to the output range; tolerance ``EXPORT_TOLERANCE``), and RD's
predicted distortion beside the ``glob`` baseline's at the same budget.

Elsewhere (``--device cpu``, or no such GPU): says that 2:4 kernels need CUDA sm80+ and runs only
a tiny smoke version of the mask, curve and allocation path (a two-block ViT on 28x28 inputs),
checking the curves against the plain loop. Exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from rdprune.bench.report import machine_line
from rdprune.core.curves import synthetic_inputs
from rdprune.core.grid import Curve
from rdprune.granularity.two_four.kernels import EXPORT_TOLERANCE, export_difference, kernels_missing, model_latency_s, to_two_four
from rdprune.granularity.two_four.units import (
    allocate_two_four,
    apply_two_four,
    candidates,
    estimate_two_four_curves,
    glob_two_four,
    is_two_four,
    layer_cost,
    plain_two_four_curves,
)

SMOKE_MODEL = {"model_name": "vit_tiny_patch16_224", "num_classes": 10, "img_size": 28, "patch_size": 7, "in_chans": 1,
               "embed_dim": 64, "depth": 2, "num_heads": 4}


def _timm_model(**kwargs: object) -> torch.nn.Module:
    try:
        import timm
    except ImportError as err:
        raise SystemExit(f"this benchmark builds timm models: pip install 'rdprune[timm]' ({err})") from None
    return timm.create_model(**kwargs).eval()


def _choices(model: torch.nn.Module, inputs: torch.Tensor, target: float) -> tuple[dict[str, Curve], list[str], float, float]:
    """(curves, RD's layers, RD's predicted distortion, glob's summed distortion) at the ``layers`` budget ``target``."""
    layers, _ = candidates(model)
    curves = estimate_two_four_curves(model, layers, inputs, batch_size=len(inputs), progress=False)
    cost = layer_cost(layers)
    rd = allocate_two_four(curves, cost, target)
    glob = glob_two_four(layers, cost, target)
    return curves, rd.choice, rd.distortion, sum(float(curves[n].distortion[1]) for n in glob.choice)


def smoke(reason: str) -> int:
    """The CPU path: masks, exact curves against the plain loop, and the allocation, on a tiny ViT."""
    print(f"no 2:4 speed benchmark here: {reason} (sm80+).")
    print("Running only the smoke test of the mask, curve and allocation path on the CPU (no speed is measured).")
    torch.manual_seed(0)
    model = _timm_model(**SMOKE_MODEL)
    layers, left_out = candidates(model)
    inputs = synthetic_inputs(8, (1, 28, 28))
    start = time.perf_counter()
    curves, chosen, predicted, glob = _choices(model, inputs, 0.5)
    plain = plain_two_four_curves(model, layers, inputs, batch_size=len(inputs))
    worst = max(float(np.abs(curves[n].distortion - plain[n].distortion).max() / max(plain[n].distortion.max(), 1e-30)) for n in layers)
    pruned = copy.deepcopy(model)
    masks = apply_two_four(candidates(pruned)[0], chosen)
    valid = all(is_two_four(m) for m in masks.values())
    print(f"tiny ViT: {len(layers)} candidate layers, {len(left_out)} left out ({', '.join(n for n, _ in left_out)})")
    print(f"RD chose {len(chosen)} of {len(layers)} layers 2:4: predicted distortion {predicted:.3e} (glob at the same budget "
          f"{glob:.3e}); curves vs plain loop: largest difference {worst:.1e} of the curve's scale (tolerance 1e-6); "
          f"masks valid 2:4: {valid}; {time.perf_counter() - start:.1f} s")
    return 0 if worst <= 1e-6 and valid else 1


def on_gpu(args: argparse.Namespace, device: torch.device) -> int:
    """The CUDA path: dense, all candidates 2:4 and RD's half, timed interleaved in bf16."""
    torch.manual_seed(0)
    model = _timm_model(model_name=args.model).to(device)
    shape = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    layers, left_out = candidates(model)
    start = time.perf_counter()
    _, chosen, predicted, glob = _choices(model, synthetic_inputs(args.inputs, shape).to(device), 0.5)
    curve_s = time.perf_counter() - start
    print(f"{args.model}: {len(layers)} candidate Linear layers, {len(left_out)} left out; RD chose {len(chosen)} "
          f"(curves on {args.inputs} noise images in {curve_s:.1f} s; predicted distortion {predicted:.3e}, glob {glob:.3e})")
    example = torch.randn(args.batch, *shape)
    dense = copy.deepcopy(model).to(dtype=torch.bfloat16).eval()
    variants = {}
    for label, names in (("all candidates 2:4", list(layers)), ("RD's half 2:4", chosen)):
        masked = copy.deepcopy(model)
        apply_two_four(candidates(masked)[0], names)
        sparse = to_two_four(masked, names, device=device)
        difference = export_difference(masked.to(dtype=torch.bfloat16).eval(), sparse, example)
        variants[label] = (sparse, difference)
        del masked
    times = model_latency_s([dense, *(s for s, _ in variants.values())], example, args.repeats)
    print(f"bf16, batch {args.batch}, {torch.cuda.get_device_name(device)}, median of {args.repeats} interleaved passes:")
    print(f"  dense: {1e3 * times[0]:.2f} ms")
    ok = True
    for (label, (_, difference)), seconds in zip(variants.items(), times[1:]):
        ok &= difference <= EXPORT_TOLERANCE
        print(f"  {label}: {1e3 * seconds:.2f} ms, speedup {times[0] / seconds:.2f}x; largest output difference "
              f"{difference:.2e} of the output range (tolerance {EXPORT_TOLERANCE:.0e})")
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdprune.bench semi_structured", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="a timm model name (random weights)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--inputs", type=int, default=16, help="random-noise calibration images for RD's curves")
    parser.add_argument("--repeats", type=int, default=30, help="timed forward passes per model")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (the smoke test only)")
    args = parser.parse_args(argv)
    print(machine_line())
    device = torch.device(args.device)
    reason = kernels_missing(device)
    if reason is not None:
        return smoke(reason)
    return on_gpu(args, device)
