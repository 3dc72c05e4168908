"""The GPU side: curves, pipeline runs (DDP and DeepSpeed through NCCL), BatchNorm, latency and DALI on CUDA.

Tests marked ``gpu`` skip with the reason where CUDA is missing (conftest); tests/gpu/run_all.sh runs
them on one GPU. Tests of optional packages (DeepSpeed, DALI, Torch-Pruning) skip where the package
is missing. The unmarked tests check, on any machine, the one-line errors for device requests that
cannot be met. With RDPRUNE_GPU_REPORT set, the measured tolerances are appended there (JSON lines)
for run_all.sh's summary.

TF32: PyTorch runs cuDNN convolutions in TF32 by default (``torch.backends.cudnn.allow_tf32``), and
rdprune leaves that setting to the user. On CUDA, estimate_curves equals plain_curves within the
core's 1e-6 x max|D| in either mode (the same kernels run on the same values). CUDA curves equal CPU
curves within CPU_TOLERANCE["off"] of max|D| with TF32 off (fp32 summation order only) and within
CPU_TOLERANCE["on"] with PyTorch's default (TF32 keeps 10 mantissa bits: about 1e-3 relative error
per activation).
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rdprune.bench.curves import noise_statistics
from rdprune.core.batchnorm import batchnorm_layers, recalibrate_batchnorm
from rdprune.core.curves import estimate_curves, plain_curves, synthetic_inputs
from rdprune.core.timing import layer_shapes, measure_latency
from rdprune.distributed.collectives import check_precision
from rdprune.errors import UserError
from rdprune.granularity.channel.latency import LatencyTable
from rdprune.granularity.two_four.kernels import (
    EXPORT_TOLERANCE,
    export_difference,
    kernels_missing,
    layer_latency_us,
    linear_input_shapes,
    model_latency_s,
    to_two_four,
)
from rdprune.granularity.two_four.units import apply_two_four, candidates, is_two_four
from rdprune.models.registry import build_model

from cli_errors import user_error
from launch import clean_env

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
CHANNELS = ROOT / "configs" / "quickstart_channels.yaml"
BN_MODEL = "model.name=dist_scripts.user_models:batchnorm_cnn"
UNTRAINED = "model.checkpoint=null"  # the config names the shipped checkpoint of another model
ONE_ITERATION = [BN_MODEL, UNTRAINED, "run.device=cuda", "pretrain.steps=30", "finetune.steps=8", "prune.levels=11",
                 "prune.target_sparsity=0.5", "prune.amount_per_iteration=0.5", "calibration.size=64",
                 "calibration.batch_size=32", "calibration.bn_images=128", "run.progress=false", "run.threads=1"]
CHANNEL_RUN = [BN_MODEL, UNTRAINED, "run.device=cuda", "pretrain.steps=30", "finetune.steps=4", "prune.levels=6",
               "prune.target_sparsity=0.4", "prune.amount_per_iteration=0.25", "calibration.size=64",
               "calibration.batch_size=64", "calibration.bn_images=128", "latency.batch_size=16", "latency.time_limit_s=10",
               "latency.repeats=5", "run.progress=false", "run.threads=1"]
TWO_FOUR_RUN = ["model.name=dist_scripts.vit_models:small_vit", "run.device=cuda", "prune.granularity=semi_structured",
                "prune.budget=latency", "prune.target_sparsity=0.02", "prune.amount_per_iteration=1.0", "pretrain.steps=30",
                "pretrain.optimizer=adamw", "pretrain.lr=0.001", "finetune.steps=4", "finetune.optimizer=adamw", "finetune.lr=0.0003",
                "calibration.size=64", "calibration.batch_size=64", "latency.batch_size=1024", "latency.repeats=10",
                "run.progress=false", "run.threads=1"]
CORE_TOLERANCE = 1e-6
CPU_TOLERANCE = {"off": 1e-4, "on": 2e-2}
"""Largest |CUDA - CPU| / max|D| per layer, with TF32 off and with PyTorch's default (TF32 convolutions)."""

gpu = pytest.mark.gpu


def report(**figures: object) -> None:
    """Append ``figures`` to $RDPRUNE_GPU_REPORT (JSON lines) for run_all.sh's summary."""
    path = os.environ.get("RDPRUNE_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(figures) + "\n")


def worst_relative(a: dict, b: dict) -> float:
    """Largest |a - b| over levels relative to the layer's max|D| in ``b``, over all layers."""
    assert list(a) == list(b)
    worst = 0.0
    for name, ref in b.items():
        np.testing.assert_array_equal(a[name].amounts, ref.amounts)
        scale = float(np.abs(ref.distortion).max()) or 1.0
        worst = max(worst, float(np.abs(a[name].distortion - ref.distortion).max()) / scale)
    return worst


@pytest.fixture
def tf32_mode(request):
    """Set TF32 for CUDA convolutions and matmuls to ``request.param`` ("on" / "off"), restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = request.param == "on"
    yield request.param
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cifar_resnet() -> tuple[torch.nn.Module, torch.Tensor]:
    """CIFAR ResNet-20 with random weights and BatchNorm statistics of noise, and 48 calibration inputs."""
    torch.manual_seed(0)
    model = noise_statistics(build_model("resnet20_cifar", 10, input_shape=(3, 32, 32)), torch.randn(64, 3, 32, 32))
    return model, synthetic_inputs(48, (3, 32, 32), seed=1)


# ---------------------------------------------------------------------------------------------- curves


@gpu
@pytest.mark.parametrize("tf32_mode", ["off", "on"], indirect=True)
@pytest.mark.parametrize("worst_case", [False, True], ids=["mse", "worst_case"])
def test_cuda_curves_equal_plain_and_cpu_and_repeat(tf32_mode, worst_case, one_thread):
    model, inputs = cifar_resnet()
    settings = {"grid": "absolute", "worst_case": worst_case, "batch_size": 16}  # three batches: accumulation on the device
    on_cpu = estimate_curves(model, inputs, 11, progress=False, **settings)
    model.cuda()
    fast = estimate_curves(model, inputs, 11, progress=False, **settings)
    again = estimate_curves(model, inputs, 11, progress=False, **settings)
    plain = plain_curves(model, inputs, 11, **settings)
    for name in fast:
        np.testing.assert_array_equal(fast[name].distortion, again[name].distortion, err_msg=f"{name} differs run to run")
    vs_plain, vs_cpu = worst_relative(fast, plain), worst_relative(fast, on_cpu)
    report(check=f"curves tf32={tf32_mode} {'worst_case' if worst_case else 'mse'}", cuda_vs_plain=vs_plain, cuda_vs_cpu=vs_cpu)
    assert vs_plain <= CORE_TOLERANCE
    assert vs_cpu <= CPU_TOLERANCE[tf32_mode]


@gpu
def test_batchnorm_recalibration_on_cuda_matches_cpu(one_thread):
    model, inputs = cifar_resnet()
    recalibrate_batchnorm(model, inputs, batch_size=16)  # several batches: the layer-by-layer path
    expected = {n: (bn.running_mean.clone(), bn.running_var.clone()) for n, bn in batchnorm_layers(model).items()}
    for bn in batchnorm_layers(model).values():
        bn.reset_running_stats()
    model.cuda()
    for batch_size in (16, 48):  # layer by layer, then one pass
        order = recalibrate_batchnorm(model, inputs.cuda(), batch_size=batch_size)
        assert sorted(order) == sorted(expected)
        for name, bn in batchnorm_layers(model).items():
            assert bn.running_mean.is_cuda
            torch.testing.assert_close(bn.running_mean.cpu(), expected[name][0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(bn.running_var.cpu(), expected[name][1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- latency


@gpu
def test_latency_on_cuda_is_measured_and_grows_with_work():
    small = torch.nn.Conv2d(64, 64, 3, padding=1).cuda().eval()
    large = torch.nn.Conv2d(64, 1024, 3, padding=1).cuda().eval()  # 16 times the FLOPs
    times = measure_latency([small, large], torch.randn(32, 64, 56, 56), repeats=9, warmup=3, device="cuda")
    assert len(times) == 2 and 0 < times[0] < times[1]
    model, _ = cifar_resnet()
    model.cuda().eval()
    x = torch.randn(8, 3, 32, 32)
    shapes = layer_shapes(model, x.cuda())
    table = LatencyTable.build(model, x, shapes, points=3, device="cuda", time_limit_s=30.0)
    assert table.meta["device"].startswith("cuda") and table.dense > 0 and table.other >= 0
    assert list(table.layers) == list(shapes)
    assert all(t > 0 for g in table.layers.values() for t in np.ravel(g.times))
    report(check="latency", conv_ms=[round(t * 1e3, 4) for t in times], resnet20_dense_ms=round(table.dense * 1e3, 4))


# ---------------------------------------------------------------------------------------------- pipeline


def run_pipeline(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rdprune.run", str(config), f"run.out_dir={out}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def check_final_model_on_cpu(out: Path) -> None:
    """Pruned weights are exactly zero after fine-tuning on the GPU, and the final state_dict loads as a
    CPU-only user loads it: no CUDA in the process, no map_location, the unmodified architecture."""
    masks = torch.load(out / "final" / "masks.pt", weights_only=True)
    state = torch.load(out / "final" / "model.pt", map_location="cpu", weights_only=True)
    assert masks and any(not bool(m.all()) for m in masks.values())
    for name, mask in masks.items():
        assert torch.all(state[f"{name}.weight"][~mask] == 0), f"{name}: pruned weights moved during fine-tuning"
    code = ("import sys, torch; from dist_scripts.user_models import batchnorm_cnn; "
            "state = torch.load(sys.argv[1], weights_only=True); m = batchnorm_cnn(10); m.load_state_dict(state); "
            "assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point()); print('loaded')")
    proc = subprocess.run([sys.executable, "-c", code, str(out / "final" / "model.pt")], capture_output=True, text=True,
                          env=clean_env(CUDA_VISIBLE_DEVICES=""), timeout=120)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-2000:]


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@gpu
def test_ddp_through_nccl_one_iteration(tmp_path):
    out = tmp_path / "ddp"
    proc = run_pipeline(QUICKSTART, out, *ONE_ITERATION, "distributed.force_process_group=true")
    assert "training in DistributedDataParallel: 1 rank, backend nccl, device cuda:0" in proc.stderr
    rows = results(out)
    assert [r["iteration"] for r in rows] == [0, 1] and abs(rows[1]["sparsity"] - 0.5) <= 0.005
    check_final_model_on_cpu(out)


@gpu
def test_deepspeed_zero2_bf16_with_batchnorm_one_iteration(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'rdprune[deepspeed]')")
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip(f"{torch.cuda.get_device_name()} has no native bf16")
    out = tmp_path / "deepspeed"
    run_pipeline(QUICKSTART, out, *ONE_ITERATION, "distributed.engine=deepspeed", "distributed.zero_stage=2",
                 "distributed.precision=bf16")
    rows = results(out)
    assert [r["iteration"] for r in rows] == [0, 1] and abs(rows[1]["sparsity"] - 0.5) <= 0.005
    check_final_model_on_cpu(out)


@gpu
def test_channel_run_measures_latency_on_cuda(tmp_path):
    pytest.importorskip("torch_pruning", reason="Torch-Pruning is not installed (pip install 'rdprune[channels]')")
    out = tmp_path / "channels"
    run_pipeline(CHANNELS, out, *CHANNEL_RUN)
    rows = results(out)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["latency_dense_ms"] > 0 and r["latency_ms"] > 0 and r["latency_predicted_ms"] > 0
        assert r["cost_remaining"] <= 1 - r["target_sparsity"] + 1e-9
    table = json.loads((out / "latency_table.json").read_text())
    assert table["meta"]["device"].startswith("cuda")
    check_final_model_on_cpu(out)
    report(check="channel run", latency_ms=[r["latency_ms"] for r in rows[1:]],
           predicted_ms=[r["latency_predicted_ms"] for r in rows[1:]])


# ---------------------------------------------------------------------------------------------- 2:4


def two_four_kernels() -> None:
    """Skip, with the reason, on a GPU without 2:4 kernels (compute capability below 8.0)."""
    reason = kernels_missing()
    if reason is not None:
        pytest.skip(reason)


@gpu
def test_two_four_export_equals_the_masked_dense_model_and_is_timed():
    two_four_kernels()
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224").cuda().eval()  # random weights: speed and exactness only
    layers, _ = candidates(model)
    apply_two_four(layers, list(layers))
    sparse = to_two_four(model, list(layers))
    dense = copy.deepcopy(model).to(dtype=torch.bfloat16).eval()
    x = torch.randn(64, 3, 224, 224)
    difference = export_difference(dense, sparse, x)
    modules = dict(dense.named_modules())
    shapes = linear_input_shapes(dense, layers, x.cuda().bfloat16())
    dense_us, sparse_us = layer_latency_us({n: modules[n] for n in layers}, shapes)
    dense_s, sparse_s = model_latency_s([dense, sparse], x, repeats=20)
    first = list(layers)[:4]
    report(check="2:4 export deit_small bf16 batch 64", max_output_difference=difference, dense_ms=round(1e3 * dense_s, 3),
           two_four_ms=round(1e3 * sparse_s, 3), speedup=round(dense_s / sparse_s, 3),
           block0_us={n: (dense_us[n], sparse_us[n]) for n in first})
    assert difference <= EXPORT_TOLERANCE
    assert all(isinstance(v, int) and v >= 1 for v in [*dense_us.values(), *sparse_us.values()])
    assert len(layers) == 48 and shapes[first[0]] == (64, 197, 384)


@gpu
def test_two_four_run_with_a_latency_budget_exports_and_times_the_model(tmp_path):
    two_four_kernels()
    pytest.importorskip("timm")
    out = tmp_path / "two_four"
    run_pipeline(QUICKSTART, out, *TWO_FOUR_RUN)
    rows = results(out)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[1]["cost_remaining"] <= 1 - rows[1]["target_sparsity"] + 1e-9 and rows[1]["layers_2to4"] >= 1
    table = json.loads((out / "latency_table.json").read_text())
    final = json.loads((out / "final" / "semi_structured.json").read_text())
    export = final["export"]
    report(check="2:4 run, latency budget", predicted_ms=rows[1]["latency_predicted_ms"], model_us=table["model_us"],
           layers_2to4=final["layers_2to4"], left_out=[e["layer"] for e in final["left_out"]], export=export)
    assert export["run"] and export["within_tolerance"] and export["dense_ms"] > 0 and export["two_four_ms"] > 0
    state = torch.load(out / "final" / "model.pt", map_location="cpu", weights_only=True)
    assert all(is_two_four(state[f"{n}.weight"]) for n in final["layers_2to4"])


def test_two_four_kernels_on_an_old_gpu_are_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert kernels_missing("cuda") == "2:4 kernels need compute capability 8.0 or newer; Tesla V100-SXM2-16GB has 7.0"
    assert "not on cpu" in kernels_missing("cpu")


# ---------------------------------------------------------------------------------------------- DALI


@gpu
def test_dali_mixed_decoding_matches_the_cpu_path(tmp_path):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'rdprune[dali]')")
    from test_dali import make_imagefolder, reference, samples_of

    from rdprune.data import dali

    root = make_imagefolder(tmp_path / "imagenet", {"train": 4, "val": 3})
    train, val = samples_of(root / "train"), samples_of(root / "val")
    cuda = torch.device("cuda", 0)
    x, y = next(dali.train_batches(train, 6, 0, 1, cuda, seed=0, threads=2))
    assert x.is_cuda and x.shape == (6, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) <= set(range(3)) and x.abs().max() < 3  # ImageNet-normalised, not raw pixels
    on_gpu = list(dali.eval_batches(val, 4, 0, 1, cuda, threads=2))
    on_cpu = list(dali.eval_batches(val, 4, 0, 1, torch.device("cpu"), threads=2))
    gx, gy = torch.cat([b[0].cpu() for b in on_gpu]), torch.cat([b[1].cpu() for b in on_gpu])
    cx, cy = torch.cat([b[0] for b in on_cpu]), torch.cat([b[1] for b in on_cpu])
    assert torch.equal(gy, cy) and gy.tolist() == [c for _, c in val]
    assert on_gpu[0][0].is_cuda and gx.shape == cx.shape == (len(val), 3, 224, 224)
    gap = float((gx - cx).abs().mean())
    report(check="dali mixed vs cpu", mean_abs_difference=gap)
    assert gap < 0.01  # nvJPEG and libjpeg-turbo round differently; the normalisation is the same
    for image, (path, _) in zip(gx, val):
        ref = reference(path)  # the same bounds as the CPU-mode tests
        assert (image - ref).abs().mean() < 0.01 and (image - ref).abs().max() < 0.1, path


# ---------------------------------------------------------------------------------------------- bad input, any machine




@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda_is_one_line_before_any_work(capsys, tmp_path):
    out = tmp_path / "o"
    err = user_error(capsys, [str(QUICKSTART), f"run.out_dir={out}", "run.device=cuda"])
    assert err == ("rdprune: error: run.device 'cuda' was asked for, but CUDA is not available here "
                   "(torch.cuda.is_available() is False); use run.device 'cpu' or 'auto'")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_dali_gpu_decoding_without_cuda_is_one_line_before_any_work(capsys, tmp_path):
    out = tmp_path / "o"
    err = user_error(capsys, [str(QUICKSTART), f"run.out_dir={out}", "data.name=imagenet", f"data.root={tmp_path}",
                              "data.backend=dali", "run.device=cuda"])
    assert err == ("rdprune: error: data.backend 'dali' with run.device 'cuda' decodes images on the GPU (DALI 'mixed'), "
                   "but CUDA is not available here (torch.cuda.is_available() is False); use run.device 'cpu' (DALI then "
                   "decodes on the CPU) or data.backend 'torchvision'")
    assert not out.exists()


def test_bf16_on_a_gpu_without_native_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with pytest.raises(UserError) as exc:
        check_precision("bf16", torch.device("cuda", 0))
    assert str(exc.value) == ("distributed.precision 'bf16' needs a GPU with native bf16 (compute capability 8.0 or later), "
                              "but cuda:0 is a Tesla V100-SXM2-16GB (7.0); use distributed.precision 'fp32'")
    check_precision("fp32", torch.device("cuda", 0))
    check_precision("bf16", torch.device("cpu"))


def test_forced_process_group_wraps_ddp_at_world_size_one(tmp_path):
    """On CPU the forced group is gloo: the same code path the GPU check runs through NCCL."""
    out = tmp_path / "forced"
    cpu_run = [a for a in ONE_ITERATION if a != "run.device=cuda"]
    proc = run_pipeline(QUICKSTART, out, *cpu_run, "pretrain.steps=10", "finetune.steps=2", "distributed.force_process_group=true")
    assert "training in DistributedDataParallel: 1 rank, backend gloo, device cpu" in proc.stderr
    check_final_model_on_cpu(out)
