"""Channel granularity through the whole pipeline: a latency budget, the physically smaller model, resume, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rdprune.core.layers import prunable_layers

from cli_errors import user_error
from launch import read_rows, run_ok

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart_channels.yaml"
MODEL = "model.name=dist_scripts.user_models:batchnorm_cnn"
UNTRAINED = "model.checkpoint=null"  # the config names the shipped checkpoint of another model
REDUCED = [MODEL, UNTRAINED, "pretrain.steps=30", "finetune.steps=4", "prune.levels=6", "prune.target_sparsity=0.4",
           "prune.amount_per_iteration=0.25", "calibration.size=64", "calibration.batch_size=64", "calibration.bn_images=128",
           "latency.batch_size=16", "latency.time_limit_s=10", "latency.repeats=5", "run.progress=false", "run.threads=1"]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rdprune.run", str(CONFIG), f"run.out_dir={out}", *REDUCED, *extra]
    return run_ok(cmd)



@pytest.fixture(scope="module")
def channel_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("channels") / "run"
    (out.parent / "stderr.txt").write_text(_run(out).stderr)
    return out


def test_latency_rows_record_prediction_measurement_and_additivity(channel_run):
    rows = read_rows(channel_run)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["latency_dense_ms"] > 0 and r["latency_ms"] > 0 and r["latency_predicted_ms"] > 0
        assert np.isfinite(r["latency_model_error"]) and r["latency_corrections"] >= 0
        assert r["cost_remaining"] <= 1 - r["target_sparsity"] + 1e-9  # the latency model's budget holds
        assert r["distortion_predicted"] >= 0 and r["distortion_measured"] > 0
        assert r["distortion_lower_bound"] is None  # no provable bound for a measured latency table
    table = json.loads((channel_run / "latency_table.json").read_text())
    assert table["layers"]


def _second_iteration_widths(run: Path) -> dict:
    """The (kept in, kept out) counts iteration 2's levels give every layer: the pretrained network with
    iteration 1's removal counts applied (the counts alone fix the widths, not which channels they are)."""
    from dist_scripts.user_models import batchnorm_cnn

    from rdprune.config import load_config
    from rdprune.core.masks import enforce_masks
    from rdprune.granularity.channel.latency import level_widths
    from rdprune.granularity.channel.space import ChannelSpace
    from rdprune.granularity.channel.stage import level_plans

    cfg = load_config(run / "config.yaml")
    model = batchnorm_cnn(10)
    model.load_state_dict(torch.load(run / "pretrained.pt", weights_only=True)["model"])
    space = ChannelSpace(model, torch.zeros(1, 1, 28, 28), skip=cfg.prune.skip, min_density=cfg.prune.min_density)
    first = json.loads((run / "allocation" / "iter_01.json").read_text())["removal"]
    with torch.no_grad():
        enforce_masks(space.layers, space.channel_masks(space.channels_for(first)))
    assert {g: space.removed(g) for g in first} == first
    return level_widths(space, level_plans(cfg, space))


def test_the_second_iteration_prices_its_own_levels_and_chooses_counts_it_timed(channel_run):
    """latency.grid levels: iteration 2's levels start from what iteration 1 removed. The table is timed again
    (once, at exactly those counts) unless the first table already holds them: iteration 1 can take every
    group either nowhere or to its floor, and then iteration 2 has no new count. Either way the run
    directory's table covers iteration 2's counts, and every layer's final widths are counts of it."""
    import rdprune
    from rdprune.granularity.channel.latency import LatencyTable

    retimed = (channel_run.parent / "stderr.txt").read_text().count("the table was not timed at; timing them")
    data = json.loads((channel_run / "latency_table.json").read_text())
    widths = _second_iteration_widths(channel_run)
    assert retimed in (0, 1)
    assert LatencyTable.from_json(data).covers(widths)
    if retimed:  # the newest table was timed for iteration 2's counts, no more
        assert {name: (tuple(i), tuple(o)) for name, (i, o) in data["meta"]["channel_grid"].items()} == widths
    model = rdprune.load_model(channel_run)
    for name, module in prunable_layers(model).items():
        w = module.weight.detach()
        kept_out = int((w.flatten(1).abs().sum(1) > 0).sum())
        kept_in = int((w.transpose(0, 1).flatten(1).abs().sum(1) > 0).sum())
        assert kept_out in data["layers"][name]["kept_out"] and kept_in in data["layers"][name]["kept_in"], (name, kept_in, kept_out)


def test_masked_final_model_and_exported_smaller_model_agree(channel_run):
    from dist_scripts.user_models import batchnorm_cnn

    masked = batchnorm_cnn(10)
    masked.load_state_dict(torch.load(channel_run / "final" / "model.pt", weights_only=True))
    masked.eval()
    zero_rows = [(m.weight.flatten(1).abs().sum(1) == 0).sum().item() for m in prunable_layers(masked).values()]
    assert sum(zero_rows[:-1]) > 0  # whole output channels are gone from the convolutions
    x = torch.randn(5, 1, 28, 28)
    program = torch.export.load(str(channel_run / "final" / "smaller" / "model.pt2"))
    smaller_params = sum(v.numel() for v in program.state_dict.values())
    assert smaller_params < sum(p.numel() for p in masked.parameters())
    with torch.no_grad():
        expected = masked(x)
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(channel_run / "final" / "smaller" / "model.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected.numpy()).max() <= 1e-4 * max(1.0, float(expected.abs().max()))
    speed = json.loads((channel_run / "final" / "smaller" / "latency.json").read_text())
    assert speed["dense_ms"] > 0 and speed["pruned_ms"] > 0 and speed["parameters_pruned"] < speed["parameters_dense"]
    assert speed["timed"] == "model.pt2"  # the exported file, loaded back, is what was timed


def test_rerun_resumes_with_the_saved_latency_table(channel_run):
    table = (channel_run / "latency_table.json").read_bytes()
    rows = read_rows(channel_run)
    proc = _run(channel_run)
    assert "resuming" in proc.stderr and "latency table: reusing" in proc.stderr
    assert (channel_run / "latency_table.json").read_bytes() == table
    assert [r["iteration"] for r in read_rows(channel_run)] == [r["iteration"] for r in rows]




def test_channel_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path):
    q, out = str(CONFIG), f"run.out_dir={tmp_path / 'o'}"
    assert "prune.budget 'latency' needs prune.granularity 'channel'" in user_error(capsys, [q, "prune.granularity=weight", out])
    err = user_error(capsys, [q, "prune.method=lamp", out])
    assert "prune.method 'lamp' has no channel form; at prune.granularity 'channel' choose one of" in err
    assert "set calibration.batch_size to at least calibration.size (256)" in user_error(
        capsys, [q, "prune.bn_aware_curves=true", "calibration.batch_size=64", out])
    err = user_error(capsys, [q, "model.name=resnet20_cifar", UNTRAINED, "prune.budget=flops", out])
    assert "pass through ConstantPadNdBackward0, which maps 16 channels to 32" in err and "prune.granularity weight" in err
    err = user_error(capsys, [q, MODEL, UNTRAINED, "prune.budget=flops", "prune.target_sparsity=0.99", out])
    assert "prune.target_sparsity 0.99 is out of reach at channel granularity" in err
    assert not (tmp_path / "o").exists()


def test_an_interrupted_iteration_reuses_the_removal_it_chose(tmp_path):
    """The measured-latency choice depends on timings: a resumed iteration must not choose again."""
    out = tmp_path / "run"
    chosen = {"features.0": 2, "features.4": 5}
    target = 0.25
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "removal_iter_01.json").write_text(json.dumps({"target": target, "removal": chosen, "info": {}}))
    proc = _run(out, "prune.target_sparsity=0.25", "prune.method=unif")
    assert "reusing the removal chosen for this iteration" in proc.stderr
    assert json.loads((out / "allocation" / "iter_01.json").read_text())["removal"] == chosen
    assert not (out / "checkpoints" / "removal_iter_01.json").exists()  # gone once the iteration is recorded


def test_run_directories_of_earlier_versions_stay_resumable():
    from rdprune.config import load_config
    from rdprune.pipeline.loop import resume_key, same_run

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    old = resume_key(cfg)
    del old["prune"]["granularity"]  # written before the key existed
    assert "latency" not in old  # weight granularity: the latency section is not part of the key
    assert same_run(old, cfg)
    assert not same_run(old, load_config(ROOT / "configs" / "quickstart.yaml", ["prune.granularity=channel"]))
    assert not same_run(old, load_config(ROOT / "configs" / "quickstart.yaml", ["prune.levels=7"]))
    del old["distributed"]  # before the precision counted: those runs trained fp32 under ddp
    assert same_run(old, cfg)
    assert not same_run(old, load_config(ROOT / "configs" / "quickstart.yaml", ["distributed.precision=bf16"]))
    assert same_run(old, load_config(ROOT / "configs" / "quickstart.yaml", ["distributed.engine=deepspeed"]))
    assert resume_key(cfg)["distributed"] == {"precision": "fp32"}


@pytest.mark.distributed
def test_collective_timeout_shorter_than_the_latency_build_is_refused_up_front(tmp_path):
    from launch import torchrun
    out = tmp_path / "run"
    proc = torchrun(2, "-m", "rdprune.run", str(CONFIG), f"run.out_dir={out}", *REDUCED, "distributed.timeout_s=15", timeout=180)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rdprune: error: ")]
    assert errors == ["rdprune: error: distributed.timeout_s 15 is too short for latency.time_limit_s 10: the other ranks wait "
                      "while rank 0 times the layers, which can take longer than the limit; set distributed.timeout_s to at "
                      "least 20 or lower latency.time_limit_s"], proc.stderr[-3000:]
    assert not (out / "results.jsonl").exists() and not (out / "pretrained.pt").exists()


def test_a_channel_run_measures_its_curves_and_its_result_in_kl(tmp_path):
    """The setting reaches the curves and the measured distortion of the whole pruned network (same seed,
    same choice of calibration images: only the measure differs)."""
    flops = ["prune.budget=flops", "prune.amount_per_iteration=0.4", "prune.bn_aware_curves=true"]
    rows, curves = {}, {}
    for name in ("mse", "kl"):
        out = tmp_path / name
        _run(out, *flops, f"prune.distortion={name}")
        rows[name] = read_rows(out)[1]
        with np.load(out / "curves" / "iter_01" / "curves.npz") as saved:
            curves[name] = {k: saved[k] for k in saved.files if k.endswith("/distortion")}
    assert curves["mse"].keys() == curves["kl"].keys()
    assert all(c[0] == 0.0 for c in curves["kl"].values())  # level 0 is the unpruned network
    assert any(not np.allclose(curves["mse"][k], curves["kl"][k]) for k in curves["kl"])
    for name in ("mse", "kl"):
        assert rows[name]["distortion_measured"] > 0 and rows[name]["distortion_predicted"] > 0
    assert rows["kl"]["distortion_measured"] != pytest.approx(rows["mse"]["distortion_measured"])


def test_a_baseline_ranked_by_activation_gets_the_calibration_inputs_even_without_data(tmp_path):
    """unif needs no curves, but its ranking reads the calibration inputs: zero-data (synthetic) inputs are enough."""
    _run(tmp_path / "run", "prune.method=unif", "prune.budget=flops", "prune.amount_per_iteration=0.4",
         "prune.ranking=activation", "calibration.source=synthetic")
    rows = read_rows(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [0, 1] and rows[-1]["flops_remaining"] <= 0.6 + 1e-9
