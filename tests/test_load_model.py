"""``rdprune.load_model``: a finished run's final model, at every granularity, evaluates to the run's own last top-1."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rdprune
from rdprune.config import load_config
from rdprune.data import build_data
from rdprune.distributed import DistInfo
from rdprune.pipeline import feeding
from rdprune.training.evaluation import evaluate

from launch import clean_env

ROOT = Path(__file__).resolve().parent.parent


def _run_args(granularity: str) -> list[str]:
    """Each granularity's own test's tiny run, cut to one pruning iteration."""
    if granularity == "weight":
        from test_pipeline import QUICKSTART, REDUCED

        return [str(QUICKSTART), *REDUCED, "pretrain.steps=30", "prune.target_sparsity=0.5"]
    if granularity == "channel":
        from test_channel_pipeline import CONFIG, REDUCED

        return [str(CONFIG), *REDUCED, "prune.budget=weights", "prune.target_sparsity=0.25"]
    from test_semi_structured import QUICKSTART, RUN  # skips where timm is missing

    return [str(QUICKSTART), *RUN, "prune.target_sparsity=0.25"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """``finished(granularity)``: (run directory, the command's stdout) of a tiny finished run, run once per module."""
    done = {}

    def get(granularity: str) -> tuple[Path, str]:
        if granularity not in done:
            out = tmp_path_factory.mktemp(granularity) / "run"
            cmd = [sys.executable, "-m", "rdprune.run", *_run_args(granularity), f"run.out_dir={out}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[granularity] = out, proc.stdout
        return done[granularity]

    return get


def _last_row(out: Path) -> dict:
    return json.loads((out / "results.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("granularity", ["weight", "channel", "semi_structured"])
def test_loaded_model_evaluates_to_the_runs_last_top1(finished, granularity, one_thread):
    out, _ = finished(granularity)
    model = rdprune.load_model(out)
    assert not model.training
    cfg = load_config(out / "config.yaml")
    assert cfg.prune.granularity == granularity
    data = build_data(cfg.data.name, cfg.data.root, seed=cfg.run.seed)
    dist = DistInfo()
    top1, _ = evaluate(model, feeding.eval_batches(cfg, data, dist), dist, progress=False)
    row = _last_row(out)
    assert row["iteration"] >= 1 and row["sparsity"] > 0
    assert top1 == pytest.approx(row["top1"], abs=1e-6)


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_the_run_ends_with_the_line_that_loads_the_final_model(finished, granularity):
    out, stdout = finished(granularity)
    lines = stdout.splitlines()
    assert f'final model: {out / "final" / "model.pt"} (load it with rdprune.load_model("{out}"))' in lines
    pt2 = out / "final" / "smaller" / "model.pt2"
    smaller = f'physically smaller model: {pt2} (load it with rdprune.load_model("{out}", smaller=True))'
    assert (smaller in lines) == (granularity == "channel")
    speedup = [line for line in lines if line.startswith("measured speed-up of model.pt2: ")]
    assert len(speedup) == (granularity == "channel")  # the exported file's, timed against the dense model


def test_smaller_model_of_a_channel_run_computes_what_the_masked_one_does(finished):
    pytest.importorskip("onnxruntime")  # the run exports model.pt2 beside model.onnx, or neither
    out, _ = finished("channel")
    masked = rdprune.load_model(out)
    smaller = rdprune.load_model(out, smaller=True)
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in masked.parameters())
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(smaller(x), masked(x), rtol=1e-5, atol=1e-5)


def test_smaller_is_refused_where_the_model_keeps_its_shape(finished):
    out, _ = finished("weight")
    with pytest.raises(ValueError, match="run exported no physically smaller model"):
        rdprune.load_model(out, smaller=True)


def test_a_folder_without_a_finished_run_is_a_value_error_naming_it(tmp_path):
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(ValueError, match="holds no finished run") as info:
            rdprune.load_model(folder)
        assert str(folder / "final" / "model.pt") in str(info.value) and "run.out_dir" in str(info.value)
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="no config.yaml"):
        rdprune.load_model(tmp_path)


def test_load_model_is_public_and_lazy():
    assert "load_model" in rdprune.__all__
    from rdprune.pipeline.load import load_model

    assert rdprune.load_model is load_model
