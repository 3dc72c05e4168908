"""``python -m rdprune.bench curves``: the scale run's small-model smoke test on a CPU, and its options.

The assertions are on what the benchmark prints, never on wall time.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rdprune.bench import curves

from launch import clean_env

ROOT = Path(__file__).resolve().parent.parent


def test_small_model_smoke_run_prints_the_scale_figures():
    cmd = [sys.executable, "-m", "rdprune.bench", "curves", "--device", "cpu", "--model", "small", "--threads", "1",
           "--profile"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("machine: ")
    assert "CIFAR ResNet-20, random weights (smoke test): 20 layers, 16 calibration inputs of 3x32x32 in batches of 8, " \
           "absolute grid of 6 levels" in out
    assert re.search(r"estimate_curves, all 20 layers: [\d.]+ s wall; peak RSS of the process \d+ MB; plain / fast [\d.]+x", out)
    assert re.search(r"plain loop on 3 of 20 layers \(conv1, [\w.]+, fc\): [\d.]+ s; scaled to all layers: [\d.]+ s\n", out)
    assert "max |difference| / max|D| on the sampled layers: bit-identical (tolerance 1e-06)" in out
    assert "torch.profiler, estimate_curves on conv1, " in out and "aten::" in out  # the operator table
    summary = dict(kv.split("=", 1) for kv in out.split("summary: ", 1)[1].splitlines()[0].split())
    assert summary["model"] == "small" and summary["device"] == "cpu" and summary["layers"] == "20"
    assert summary["levels"] == "6" and summary["samples"] == "16" and summary["batch"] == "8"
    assert summary["within_tolerance"] == "yes" and float(summary["fast_s"]) > 0 and float(summary["speedup"]) > 0
    assert out.rstrip().endswith("values within tolerance")


@pytest.mark.parametrize("model, extra, layers, sampled", [
    ("vit_small", "timm", 18, "patch_embed.proj, blocks.1.mlp.fc2, head"),
    # transformers' ViT of the same shape: fx cannot trace it, the curves replay module outputs
    pytest.param("hf_vit_small", "transformers", 26,
                 "model.vit.embeddings.patch_embeddings.projection, model.vit.[\\w.]+, model.classifier", marks=pytest.mark.slow),
])
def test_transformer_smoke_run_is_exact(model, extra, layers, sampled):
    pytest.importorskip(extra)
    cmd = [sys.executable, "-m", "rdprune.bench", "curves", "--device", "cpu", "--model", model, "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(f"plain loop on 3 of {layers} layers \\({sampled}\\)", proc.stdout), proc.stdout
    summary = dict(kv.split("=", 1) for kv in proc.stdout.split("summary: ", 1)[1].splitlines()[0].split())
    assert summary["model"] == model and summary["layers"] == str(layers) and summary["within_tolerance"] == "yes"


def test_layers_are_sampled_evenly_with_both_ends():
    names = [f"l{i}" for i in range(54)]
    assert curves.spread_layers(names, 3) == ["l0", "l26", "l53"]
    assert curves.spread_layers(names, 1) == ["l0"]
    assert curves.spread_layers(names[:2], 5) == ["l0", "l1"]
    with pytest.raises(ValueError, match="must be >= 1"):
        curves.spread_layers(names, 0)


def test_resnet50_defaults_are_the_published_settings():
    spec = curves.SCALE_MODELS["resnet50"]
    assert (spec.arch, spec.image_size, spec.samples, spec.levels) == ("resnet50", 224, 256, 101)


@pytest.mark.parametrize("argv, message", [
    (["--model", "small", "--nproc", "2"], "--nproc times CIFAR ResNet-32 only"),
    (["--model", "small", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
])
def test_bad_options_exit_with_a_message(argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        curves.main(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(SystemExit, match=re.escape("--device cuda: CUDA is not available here")):
        curves.main(["--device", "cuda"])
