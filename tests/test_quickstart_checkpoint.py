"""The pretrained checkpoint the channel quickstart ships: what it is, where it came from, and that the
config trains it again.

configs/checkpoints/quickstart_channels.json is its provenance: ``file`` (the path model.checkpoint names,
relative to the repository root), ``sha256``, ``command`` (the exact command that trained it), ``pretrain_only_overrides``
(overrides of configs/quickstart_channels.yaml that pretrain and stop: model.checkpoint=null prune.granularity=weight
prune.budget=weights prune.method=unif prune.target_sparsity=0 prune.amount_per_iteration=1.0 prune.min_density=0
finetune.steps=0 calibration.bn_recalibration=false), ``torch`` (version), ``git_revision``, ``numerics`` (the run's
provenance.json entry: CPU, torch CPU capability, threads) and ``top1`` (its test top-1, %). The file itself is the
run's pretrained.pt ``["model"]`` state_dict, saved alone.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rdprune.config import load_config
from rdprune.data import build_data
from rdprune.distributed import DistInfo
from rdprune.models.registry import build_model
from rdprune.pipeline import feeding
from rdprune.training.evaluation import evaluate

from launch import clean_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart_channels.yaml"
PROVENANCE = ROOT / "configs" / "checkpoints" / "quickstart_channels.json"

pytestmark = pytest.mark.skipif(not PROVENANCE.exists(), reason="the channel quickstart's pretrained checkpoint is not shipped "
                                "yet (issue 22, item 1): configs/checkpoints/quickstart_channels.{pt,json} missing")


def _provenance() -> dict:
    return json.loads(PROVENANCE.read_text())


def _top1(cfg, state: dict) -> float:
    data = build_data(cfg.data.name, cfg.data.root, seed=cfg.run.seed)
    model = build_model(cfg.model.name, data.num_classes, input_shape=data.input_shape)
    model.load_state_dict(state)
    dist = DistInfo()
    return evaluate(model.eval(), feeding.eval_batches(cfg, data, dist), dist, progress=False)[0]


def test_the_config_names_the_shipped_checkpoint_and_its_provenance_matches():
    cfg = load_config(CONFIG)
    info = _provenance()
    path = ROOT / cfg.model.checkpoint
    assert cfg.model.checkpoint == info["file"] and path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
    assert path.stat().st_size < 2_000_000  # about 1 MB: shipped in the repository
    for key in ("command", "torch", "git_revision", "numerics", "top1"):
        assert info[key], key


def test_the_shipped_checkpoint_loads_safely_and_scores_its_recorded_top1():
    cfg = load_config(CONFIG)
    state = torch.load(ROOT / cfg.model.checkpoint, map_location="cpu", weights_only=True)
    assert _top1(cfg, state) == pytest.approx(_provenance()["top1"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.soak  # pretrains the ResNet-20 for 600 steps: 6-8 minutes of CPU time; launch/test.sh -m soak runs it
def test_the_config_trains_the_shipped_checkpoint_again(tmp_path):
    """Pretraining as the config says gives the shipped weights bit for bit where the kernels round alike (same
    torch version and CPU capability, one thread), else the same top-1 within 0.5 points (5 test digits)."""
    info = _provenance()
    out = tmp_path / "pretrain"
    cmd = [sys.executable, "-m", "rdprune.run", str(CONFIG), *info["pretrain_only_overrides"], f"run.out_dir={out}",
           "run.progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=7200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = torch.load(out / "pretrained.pt", map_location="cpu", weights_only=True)["model"]
    shipped = torch.load(ROOT / info["file"], map_location="cpu", weights_only=True)
    numerics = json.loads((out / "provenance.json").read_text())["numerics"]
    alike = numerics["torch_cpu_capability"] == info["numerics"]["torch_cpu_capability"] and torch.__version__ == info["torch"]
    if alike:
        assert again.keys() == shipped.keys() and all(torch.equal(again[k], shipped[k]) for k in shipped)
    else:
        assert _top1(load_config(CONFIG), again) == pytest.approx(info["top1"], abs=0.5)
