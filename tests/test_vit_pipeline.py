"""A Vision Transformer from timm through every stage: exact curves with suffix reuse, allocation,
masks, fine-tuning with DDP and DeepSpeed, resume, and torchrun at 1 and 2 ranks.

The model is ``configs/vit_tiny_digits.yaml``'s tiny ViT (``timm:vit_tiny_patch16_224`` shaped by
``model.kwargs`` for 28x28 digits), randomly initialised and pretrained briefly here: nothing is
downloaded.
"""
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rdprune.config import load_config
from rdprune.core.curves import estimate_curves, plain_curves
from rdprune.core.layers import prunable_layers
from rdprune.core.suffix import TracedNetwork
from rdprune.models.registry import build_model

from cli_errors import user_error
from launch import read_rows, run_ok, torchrun_command

timm = pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
CONFIG = str(ROOT / "configs" / "vit_tiny_digits.yaml")
SMALL = ["model.kwargs.depth=2", "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2", "run.progress=false",
         "run.threads=1", "distributed.curve_threads=1", "distributed.timeout_s=120"]
FIRST_ITERATION = ["prune.target_sparsity=0.5", "finetune.steps=0", "prune.levels=11", "calibration.size=64",
                   "calibration.batch_size=32"]



def _pipeline(out: Path, *overrides: str) -> list[str]:
    return ["-m", "rdprune.run", CONFIG, f"run.out_dir={out}", *SMALL, *overrides]



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The small ViT pretrained once for a few steps, in one process."""
    out = tmp_path_factory.mktemp("vit_pretrain") / "run"
    run_ok([sys.executable, *_pipeline(out, "pretrain.steps=30", "pretrain.warmup_steps=3", "prune.method=glob",
                                     "prune.target_sparsity=0.5", "finetune.steps=0")])
    return out / "pretrained.pt"


@pytest.mark.parametrize("override, expected", [
    ("model.name=timm:vit_tiny_patch16_22", "unknown timm model 'vit_tiny_patch16_22'"),
    ("model.kwargs.pach_size=7", "does not take keyword argument 'pach_size' (from model.kwargs)"),
    ("model.weights=DEFAULT", "not in the local cache"),
    ("model.kwargs={patch_size: 7}", "doesn't match model (224); set the model's input size with model.kwargs.img_size: 28"),
])
def test_bad_model_input_is_one_line_and_writes_nothing(capsys, tmp_path, monkeypatch, override, expected):
    for variable in ("HF_HOME", "HF_HUB_CACHE", "TORCH_HOME"):
        monkeypatch.setenv(variable, str(tmp_path / "empty_cache"))
    out = tmp_path / "run"
    line = user_error(capsys, [CONFIG, f"run.out_dir={out}", *SMALL, override])
    assert expected in line, line
    assert not out.exists()


def test_curves_reuse_suffixes_and_equal_the_plain_loop(caplog):
    cfg = load_config(CONFIG, SMALL)
    torch.manual_seed(0)
    model = build_model(cfg.model.name, 10, input_shape=(1, 28, 28), kwargs=cfg.model.kwargs)
    # The ViT traces with its prunable layers as leaves: curves re-run only the part after each layer.
    TracedNetwork(model, prunable_layers(model).values())
    x = torch.randn(48, 1, 28, 28)
    with caplog.at_level(logging.WARNING):
        fast = estimate_curves(model, x, levels=9, batch_size=16)
    assert "plain loop" not in caplog.text
    plain = plain_curves(model, x, levels=9, batch_size=16)
    assert list(fast) == list(plain) and any(".attn.qkv" in n for n in fast) and "head" in fast
    for name, curve in plain.items():
        np.testing.assert_array_equal(fast[name].amounts, curve.amounts)
        scale = np.abs(curve.distortion).max()
        assert scale > 0 and np.abs(fast[name].distortion - curve.distortion).max() <= 1e-6 * scale, name


@pytest.mark.slow  # two pipeline runs of a small ViT
def test_pipeline_prunes_finetunes_and_resumes(tmp_path, checkpoint):
    out = tmp_path / "run"
    overrides = [f"model.checkpoint={checkpoint}", "prune.target_sparsity=0.75", "prune.levels=11", "calibration.size=64",
                 "finetune.steps=6", "finetune.warmup_steps=2"]
    run_ok([sys.executable, *_pipeline(out, *overrides)])
    rows = read_rows(out)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[-1]["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert all(r["distortion_predicted"] > 0 and r["distortion_measured"] > 0 for r in rows[1:])
    final = torch.load(out / "final" / "model.pt", weights_only=True)
    masks = torch.load(out / "final" / "masks.pt", weights_only=True)
    assert "blocks.0.attn.qkv" in masks and "pos_embed" in final
    for name, mask in masks.items():  # zeros stayed zero through fine-tuning
        assert torch.all(final[f"{name}.weight"][~mask] == 0), name
    again = run_ok([sys.executable, *_pipeline(out, *overrides)])
    assert read_rows(out) == rows and "resuming" in again.stderr + again.stdout


@pytest.mark.slow  # two pipeline runs, ~20 s each
@pytest.mark.distributed
def test_first_iteration_equal_at_1_and_2_ranks(tmp_path, checkpoint):
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok([sys.executable, *_pipeline(one, f"model.checkpoint={checkpoint}", *FIRST_ITERATION)])
    run_ok(torchrun_command(2, *_pipeline(two, f"model.checkpoint={checkpoint}", *FIRST_ITERATION)))
    with np.load(one / "curves" / "iter_01" / "curves.npz") as a, np.load(two / "curves" / "iter_01" / "curves.npz") as b:
        assert sorted(a) == sorted(b) and len(a) == 2 * 10  # patch embedding, 4 Linear layers per block, head
        for key in a:
            assert np.abs(a[key] - b[key]).max() <= 1e-6 * max(np.abs(a[key]).max(), 1e-30), key
    allocation = [json.loads((p / "allocation" / "iter_01.json").read_text()) for p in (one, two)]
    assert allocation[0] == allocation[1]
    masks = [torch.load(p / "checkpoints" / "last.pt", weights_only=True)["masks"] for p in (one, two)]
    assert list(masks[0]) == list(masks[1]) and all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


@pytest.mark.slow  # two pipeline runs, ~15 s each
@pytest.mark.distributed
def test_two_four_choice_equal_at_1_and_2_ranks(tmp_path, checkpoint):
    """2:4 granularity: each candidate's 2:4 level is a piece sharded over the ranks; rank 0 chooses, all apply."""
    two_four = [f"model.checkpoint={checkpoint}", *FIRST_ITERATION, "prune.granularity=semi_structured", "prune.budget=layers"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok([sys.executable, *_pipeline(one, *two_four)])
    run_ok(torchrun_command(2, *_pipeline(two, *two_four)))
    with np.load(one / "curves" / "iter_01" / "curves.npz") as a, np.load(two / "curves" / "iter_01" / "curves.npz") as b:
        # at width 32 only the fc2 layers (32 x 64) have a shape the 2:4 kernels take: one piece per rank
        assert sorted(a) == sorted(b) == ["blocks.0.mlp.fc2/amounts", "blocks.0.mlp.fc2/distortion", "blocks.1.mlp.fc2/amounts",
                                          "blocks.1.mlp.fc2/distortion"]
        for key in a:
            assert np.abs(a[key] - b[key]).max() <= 1e-6 * max(np.abs(a[key]).max(), 1e-30), key
    reports = [json.loads((p / "final" / "semi_structured.json").read_text()) for p in (one, two)]
    assert reports[0]["layers_2to4"] == reports[1]["layers_2to4"] and len(reports[0]["layers_2to4"]) == 1
    masks = [torch.load(p / "checkpoints" / "last.pt", weights_only=True)["masks"] for p in (one, two)]
    assert sorted(masks[0]) == sorted(reports[0]["layers_2to4"])
    assert list(masks[0]) == list(masks[1]) and all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


@pytest.mark.slow  # DDP ~15 s; DeepSpeed starts slowly
@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_finetuning_keeps_zeros_and_ranks_equal(tmp_path, engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    overrides = [*SMALL, "finetune.steps=4", "finetune.warmup_steps=1", f"run.out_dir={tmp_path / 'run'}", f"distributed.engine={engine}",
                 ] + (["distributed.zero_stage=2"] if engine == "deepspeed" else [])
    proc = run_ok(torchrun_command(2, str(SCRIPTS / "finetune_masks.py"), CONFIG, *overrides), timeout=500)
    assert all(f"{engine} fine-tuning ok on rank {r}" in proc.stdout for r in (0, 1)), proc.stdout


def _hf_vit(folder: Path) -> str:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=2,
                                    num_attention_heads=3, intermediate_size=96, num_labels=10)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return f"hf:{folder}"


@pytest.mark.parametrize("family", [
    "swin", "hf_vit", pytest.param("convnext", marks=pytest.mark.slow)])
def test_curves_of_other_families_equal_the_plain_loop(family, tmp_path, caplog, one_thread):
    """Swin and ConvNeXt (timm) trace, so curves re-run suffixes only; a Hugging Face ViT does not trace
    (control flow on traced values) and replays the modules that run before each layer, with one warning. All exact."""
    name, kwargs = {
        "swin": ("timm:swin_tiny_patch4_window7_224",
                 dict(img_size=56, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=7)),
        "convnext": ("timm:convnext_atto", {}),
        "hf_vit": (None, {}),
    }[family]
    name = name or _hf_vit(tmp_path / "hf_vit")
    shape = (3, 56, 56) if family == "swin" else (3, 32, 32)
    torch.manual_seed(0)
    model = build_model(name, 10, input_shape=shape, kwargs=kwargs)
    x = torch.randn(8, *shape)
    with caplog.at_level(logging.WARNING):
        fast = estimate_curves(model, x, levels=4, batch_size=4, progress=False)
    assert ("by replaying, for each layer" in caplog.text) == (family == "hf_vit"), caplog.text
    assert "plain loop" not in caplog.text
    plain = plain_curves(model, x, levels=4, batch_size=4)
    assert list(fast) == list(plain) and len(fast) > 8
    for layer, curve in plain.items():
        scale = np.abs(curve.distortion).max()
        assert scale > 0 and np.abs(fast[layer].distortion - curve.distortion).max() <= 1e-6 * scale, layer
