"""The quickstart pipeline end to end on real mnist5k digits, resume after kills, and user errors."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rdprune.core.layers import prunable_layers
from rdprune.models.registry import build_model

from cli_errors import user_error
from launch import read_rows

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
REDUCED = [
    "pretrain.steps=60", "finetune.steps=8", "prune.levels=11", "prune.target_sparsity=0.9",
    "calibration.size=64", "calibration.batch_size=32", "run.progress=false", "run.threads=1",
]
SCHEDULE = [0.5, 0.75, 0.875, 0.9]


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rdprune.run", str(QUICKSTART), f"run.out_dir={out}", *REDUCED, *extra]


def _run(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(out, *extra), capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc



def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick") / "run"
    proc = _run(out)
    assert "iter" in proc.stdout and "sparsity" in proc.stdout  # the end-of-run table
    return out


def test_results_sparsity_and_outputs(finished_run):
    rows = read_rows(finished_run)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["sparsity"] == 0 and rows[0]["flops_remaining"] == 1
    for r, target in zip(rows[1:], SCHEDULE):
        assert r["target_sparsity"] == pytest.approx(target)
        assert abs(r["sparsity"] - target) <= 0.005
        assert 0 < r["flops_remaining"] < 1 and 0 <= r["top1_pruned"] <= 100 and 0 <= r["top1"] <= 100
        assert set(r) >= {"method", "loss", "seconds"}
    assert rows[0]["top1"] > 60  # the pretrained dense CNN learned the real digits
    for name in ("config.yaml", "provenance.json", "final/model.pt", "final/masks.pt", "plots/rd_curves.png",
                 "plots/layer_sparsity.png", "plots/accuracy.png", "allocation/iter_04.json", "curves/iter_04/curves.npz"):
        assert (finished_run / name).exists(), name
    assert not list(finished_run.rglob("*.tmp"))
    # Colleagues can read the results as the user's umask allows (the runner's umask is 022 or stricter).
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("results.jsonl", "config.yaml", "provenance.json", "final/model.pt", "plots/accuracy.png",
                 "allocation/iter_04.json", "checkpoints/last.pt"):
        assert (finished_run / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_final_state_dict_loads_into_plain_model_with_zeros(finished_run):
    state = torch.load(finished_run / "final" / "model.pt", weights_only=True)
    masks = torch.load(finished_run / "final" / "masks.pt", weights_only=True)
    model = build_model("small_cnn", 10)
    model.load_state_dict(state)  # strict: the unmodified architecture
    layers = prunable_layers(model)
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    total = sum(m.weight.numel() for m in layers.values())
    assert abs(zeros / total - 0.9) <= 0.005
    for name, m in layers.items():
        assert torch.all(m.weight[~masks[name]] == 0)


def _kill_when(out: Path, ready, extra=()) -> None:
    proc = subprocess.Popen(_command(out, *extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()



def test_two_runs_on_one_machine_give_identical_rows(finished_run, tmp_path):
    """Figures that reproduce: the same command on one machine gives the same rows and masks, bit for bit,
    whatever Python's hash seed (set and dict order of names); the run records what decides its rounding."""
    out = tmp_path / "again"
    proc = subprocess.run(_command(out), capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_rows(out, timings=False) == read_rows(finished_run, timings=False)
    masks = [torch.load(run / "final" / "masks.pt", weights_only=True) for run in (out, finished_run)]
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    numerics = yaml.safe_load((out / "provenance.json").read_text())["numerics"]
    assert numerics["threads"] == 1 and numerics["deterministic_algorithms"] is True
    assert numerics["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()

@pytest.mark.slow
def test_resume_after_kill_between_iterations_matches_uninterrupted(finished_run, tmp_path):
    out = tmp_path / "run"
    _kill_when(out, lambda: (out / "results.jsonl").exists() and len((out / "results.jsonl").read_text().splitlines()) >= 3)
    assert len(read_rows(out)) in (3, 4)
    proc = _run(out)
    assert "resuming" in proc.stderr
    assert _comparable(read_rows(out)) == _comparable(read_rows(finished_run))


@pytest.mark.slow
def test_resume_after_kill_during_curve_estimation(finished_run, tmp_path):
    out = tmp_path / "run"
    cache = out / "curves" / "iter_02"
    _kill_when(out, lambda: cache.exists() and any(p.suffix != ".tmp" for p in cache.iterdir()))
    done = {p: p.stat().st_mtime_ns for p in cache.iterdir() if not p.name.startswith(".")}
    assert done and not (out / "allocation" / "iter_02.json").exists()
    _run(out)
    # layers whose curves were finished before the kill were loaded, not recomputed
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    assert _comparable(read_rows(out)) == _comparable(read_rows(finished_run))


def test_resume_false_archives_and_starts_clean(finished_run, tmp_path):
    out = tmp_path / "run"
    _run(out, "prune.target_sparsity=0.5", "prune.method=glob")
    first = read_rows(out)
    proc = _run(out, "prune.target_sparsity=0.5", "prune.method=glob", "run.resume=false")
    assert _comparable(read_rows(out)) == _comparable(first)
    archived = list((out / "archive").glob("*/results.jsonl"))
    assert len(archived) == 1 and _comparable(read_rows(archived[0].parent)) == _comparable(first)
    assert proc.returncode == 0




def _write(tmp_path: Path, text: str, name="cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_bad_input_one_line_exit_2(capsys, tmp_path):
    q = str(QUICKSTART)
    out = f"run.out_dir={tmp_path / 'o'}"
    assert "unknown key 'prune.metod' (did you mean 'prune.method'?)" in user_error(capsys, [q, "prune.metod=rd", out])
    assert "prune.target_sparsity must be" in user_error(capsys, [q, "prune.target_sparsity=1.0", out])
    assert "finetune.steps must be" in user_error(capsys, [q, "finetune.steps=-1", out])
    assert "expected an integer" in user_error(capsys, [q, "prune.levels=abc", out])
    err = user_error(capsys, [q, "data.name=cifar10", f"data.root={tmp_path}", out])
    assert "is not a CIFAR-10 folder: expected cifar-10-batches-py/" in err
    assert "does not exist" in user_error(capsys, [q, f"model.checkpoint={tmp_path / 'none.pt'}", out])
    (tmp_path / "corrupt.pt").write_bytes(os.urandom(300))
    assert "is not a readable PyTorch state_dict" in user_error(capsys, [q, f"model.checkpoint={tmp_path / 'corrupt.pt'}", out])
    torch.save(build_model("resnet20_cifar", 10).state_dict(), tmp_path / "other.pt")
    assert "does not fit model small_cnn" in user_error(capsys, [q, f"model.checkpoint={tmp_path / 'other.pt'}", out])
    assert "unknown model 'nonet'" in user_error(capsys, [q, "model.name=nonet", out])
    assert "no_such_pkg" in user_error(capsys, [q, "model.name=no_such_pkg.mod:build", out])
    assert "no_such_cfg.yaml" in user_error(capsys, [str(tmp_path / "no_such_cfg.yaml")])
    err = user_error(capsys, [q, "prune.target_sparsity=0.999", out])
    assert "prune.target_sparsity 0.999 is out of reach: with every layer keeping its floor" in err
    assert "at most 0.997" in err  # small_cnn keeps one weight per output unit: 99.75 % at most
    assert "out of reach" in user_error(capsys, [q, "prune.target_sparsity=0.9", "prune.min_density=0.2", out])
    assert "prune.min_density must be a number in [0, 1)" in user_error(capsys, [q, "prune.min_density=1", out])
    err = user_error(capsys, [q, "model.name=resnet20_cifar", "calibration.bn_images=100000", out])
    assert "calibration.bn_images is 100000, but the training set has 4000 images; choose at most 4000" in err
    assert "calibration.bn_images must be an integer >= 1" in user_error(capsys, [q, "calibration.bn_images=0", out])
    assert not (tmp_path / "o").exists()  # bad input is caught before the output directory is touched


def test_output_directory_that_is_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "taken").write_text("someone's notes\n")
    err = user_error(capsys, [str(QUICKSTART), f"run.out_dir={tmp_path / 'taken'}"])
    assert err == f"rdprune: error: run.out_dir is {tmp_path / 'taken'}, an existing file; choose a folder for run.out_dir"
    err = user_error(capsys, [str(QUICKSTART), f"run.out_dir={tmp_path / 'taken' / 'run'}"])
    assert f"a folder of run.out_dir {tmp_path / 'taken' / 'run'} is {tmp_path / 'taken'}, an existing file" in err
    assert (tmp_path / "taken").read_text() == "someone's notes\n"


def test_output_directory_in_use(capsys, tmp_path):
    from rdprune.pipeline.run_dir import RunLock

    with RunLock(tmp_path / "busy"):
        err = user_error(capsys, [str(QUICKSTART), f"run.out_dir={tmp_path / 'busy'}"])
    assert "output directory" in err and "is in use by pid" in err


def test_rerun_with_other_config_is_refused(finished_run, capsys):
    before = (finished_run / "results.jsonl").read_text()
    err = user_error(capsys, [str(QUICKSTART), f"run.out_dir={finished_run}", *REDUCED, "prune.method=lamp"])
    assert "holds a run of a different config" in err
    assert (finished_run / "results.jsonl").read_text() == before


def test_subprocess_user_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rdprune.run", str(QUICKSTART), "prune.method=rnd"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "prune.method" in proc.stderr and "lamp" in proc.stderr


def test_every_shipped_config_names_its_command():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and ("rdprune" in first or "sbatch" in first), path
        yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_deepspeed_bf16_hands_back_an_fp32_model_with_zeros(tmp_path):
    out = tmp_path / "run"
    _run(out, "distributed.engine=deepspeed", "distributed.precision=bf16", "prune.target_sparsity=0.5")
    rows = read_rows(out)
    assert abs(rows[-1]["sparsity"] - 0.5) <= 0.005 and rows[0]["top1"] > 60
    state = torch.load(out / "final" / "model.pt", weights_only=True)
    masks = torch.load(out / "final" / "masks.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    for name, mask in masks.items():
        assert torch.all(state[f"{name}.weight"][~mask] == 0)
