"""The whole pipeline (``-m rdprune.run``) under real torchrun on CPU with gloo.

Every run starts from one checkpoint pretrained once in a single process, with one thread per rank,
so runs at different world sizes must agree: the curves within the core's tolerance, the
allocation and masks exactly. The model is a small CNN with BatchNorm given as a user model
(``dist_scripts.user_models``), so buffers that training updates travel through every stage.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rdprune.core.masks import pruned_count

from launch import clean_env, read_rows, torchrun_command

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
SCRIPTS = TESTS / "dist_scripts"
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
MODEL = "model.name=dist_scripts.user_models:batchnorm_cnn"
COMMON = ["run.progress=false", "run.threads=1", "distributed.curve_threads=1", "distributed.timeout_s=120", MODEL]
# One iteration (50 %) without fine-tuning: iteration 1 depends only on the checkpoint.
FIRST_ITERATION = ["prune.target_sparsity=0.5", "finetune.steps=0", "prune.levels=11", "calibration.size=64",
                   "calibration.batch_size=32"]
# Two iterations with fine-tuning, and curve estimation long enough (a few seconds) to kill a rank in it.
TWO_ITERATIONS = ["prune.target_sparsity=0.75", "finetune.steps=5", "prune.levels=101", "calibration.size=1024",
                  "calibration.batch_size=256"]


def _pipeline(out: Path, *overrides: str) -> list[str]:
    return ["-m", "rdprune.run", QUICKSTART, f"run.out_dir={out}", *COMMON, *overrides]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc



def _allocation(out: Path, t: int) -> dict:
    return json.loads((out / "allocation" / f"iter_{t:02d}.json").read_text())


def _masks(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["masks"] if path.name == "last.pt" else torch.load(path, weights_only=True)


def _same_masks(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The BatchNorm CNN pretrained once, in one process."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    _ok(_run([sys.executable, *_pipeline(out, "pretrain.steps=40", "prune.method=glob", "prune.target_sparsity=0.5",
                                         "finetune.steps=0")]))
    return out / "pretrained.pt"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoint) -> Path:
    """An uninterrupted two-iteration run on 2 ranks: what repeated and restarted runs must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _ok(_run(torchrun_command(2, *_pipeline(out, f"model.checkpoint={checkpoint}", *TWO_ITERATIONS))))
    return out


@pytest.mark.slow  # four pipeline runs, ~15 s each
@pytest.mark.distributed
def test_first_iteration_equal_at_1_2_3_ranks(tmp_path, checkpoint):
    one = tmp_path / "one"
    _ok(_run([sys.executable, *_pipeline(one, f"model.checkpoint={checkpoint}", *FIRST_ITERATION)]))
    with np.load(one / "curves" / "iter_01" / "curves.npz") as z:
        curves = dict(z)
    layers = sorted({k.split("/")[0] for k in curves})
    assert len(layers) == 3
    for nproc in (1, 2, 3):
        out = tmp_path / f"ranks{nproc}"
        _ok(_run(torchrun_command(nproc, *_pipeline(out, f"model.checkpoint={checkpoint}", *FIRST_ITERATION))))
        with np.load(out / "curves" / "iter_01" / "curves.npz") as z:
            assert sorted(z) == sorted(curves)
            for name in layers:
                ref = curves[f"{name}/distortion"]
                assert np.array_equal(z[f"{name}/amounts"], curves[f"{name}/amounts"]), (nproc, name)
                scale = np.abs(ref).max()
                assert scale > 0
                assert np.abs(z[f"{name}/distortion"] - ref).max() <= 1e-6 * scale, (nproc, name)
        assert _allocation(out, 1) == _allocation(one, 1), nproc
        assert _same_masks(_masks(out / "checkpoints" / "last.pt"), _masks(one / "checkpoints" / "last.pt")), nproc
        assert json.loads((out / "provenance.json").read_text())["world_size"] == nproc


@pytest.mark.slow  # two pipeline runs, ~20 s each
@pytest.mark.distributed
def test_channel_plan_equal_at_1_and_2_ranks(tmp_path, checkpoint):
    """Channel granularity: curves sharded in (group, level range) pieces, the removal chosen on rank 0, the same masks."""
    channels = ["prune.granularity=channel", "prune.budget=flops", "prune.target_sparsity=0.5", "finetune.steps=2",
                "prune.levels=6", "calibration.size=64", "calibration.batch_size=32", f"model.checkpoint={checkpoint}"]
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(_run([sys.executable, *_pipeline(one, *channels)]))
    _ok(_run(torchrun_command(2, *_pipeline(two, *channels))))
    assert _allocation(one, 1)["removal"] == _allocation(two, 1)["removal"]
    assert sum(_allocation(one, 1)["removal"].values()) > 0
    assert _same_masks(_masks(one / "checkpoints" / "last.pt"), _masks(two / "checkpoints" / "last.pt"))
    with np.load(one / "curves" / "iter_01" / "curves.npz") as a, np.load(two / "curves" / "iter_01" / "curves.npz") as b:
        assert sorted(a) == sorted(b) == ["features.0/amounts", "features.0/distortion", "features.4/amounts", "features.4/distortion"]
        for key in a:
            assert np.abs(a[key] - b[key]).max() <= 1e-6 * np.abs(a[key]).max(), key
    rows = read_rows(two, timings=False)
    assert rows[1]["cost_remaining"] <= 0.5 and rows[1]["distortion_measured"] > 0
    assert (two / "final" / "smaller" / "model.onnx").is_file() and (two / "final" / "smaller" / "model.pt2").is_file()


@pytest.mark.slow  # DeepSpeed starts slowly: ~70 s on a loaded 2-core machine
@pytest.mark.distributed
def test_channel_granularity_fine_tunes_under_deepspeed(tmp_path, checkpoint):
    """Removed channels stay zero through DeepSpeed ZeRO-2 fine-tuning, and the smaller model is exported."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    _ok(_run(torchrun_command(2, *_pipeline(out, "prune.granularity=channel", "prune.budget=flops", "prune.target_sparsity=0.5",
                                            "finetune.steps=3", "prune.levels=6", "calibration.size=64", "calibration.batch_size=32",
                                            f"model.checkpoint={checkpoint}", "distributed.engine=deepspeed",
                                            "distributed.zero_stage=2")), timeout=500))
    assert sum(_allocation(out, 1)["removal"].values()) > 0
    masks, final = _masks(out / "final" / "masks.pt"), torch.load(out / "final" / "model.pt", weights_only=True)
    pretrained = torch.load(checkpoint, weights_only=True)["model"]
    for name, mask in masks.items():
        weight = final[f"{name}.weight"]
        assert (weight[mask.expand_as(weight) == 0] == 0).all(), name
        assert not torch.equal(weight, pretrained[f"{name}.weight"] * mask), name  # fine-tuning moved the kept weights
    assert (out / "final" / "smaller" / "model.onnx").is_file() and (out / "final" / "smaller" / "model.pt2").is_file()


@pytest.mark.slow  # two pipeline runs on 2 ranks, ~25 s each
@pytest.mark.distributed
def test_two_runs_at_equal_world_size_agree_at_every_iteration(tmp_path, checkpoint, reference):
    out = tmp_path / "again"
    _ok(_run(torchrun_command(2, *_pipeline(out, f"model.checkpoint={checkpoint}", *TWO_ITERATIONS))))
    rows = read_rows(out, timings=False)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows == read_rows(reference, timings=False)
    for t in (1, 2):
        assert _allocation(out, t) == _allocation(reference, t)
    assert _same_masks(_masks(out / "final" / "masks.pt"), _masks(reference / "final" / "masks.pt"))
    final, ref = (torch.load(p / "final" / "model.pt", weights_only=True) for p in (out, reference))
    assert all(torch.equal(final[k], ref[k]) for k in ref)


@pytest.mark.slow  # DDP ~15 s; DeepSpeed starts slowly (~60 s or more on a loaded 2-core machine)
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
@pytest.mark.distributed
def test_finetuning_keeps_zeros_and_ranks_equal(tmp_path, engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    overrides = [MODEL, "finetune.steps=4", "run.progress=false", f"run.out_dir={tmp_path / 'run'}",
                 f"distributed.engine={engine}"] + (["distributed.zero_stage=2"] if engine == "deepspeed" else [])
    proc = _ok(_run(torchrun_command(2, str(SCRIPTS / "finetune_masks.py"), QUICKSTART, *overrides), timeout=500))
    assert all(f"{engine} fine-tuning ok on rank {r}" in proc.stdout for r in (0, 1)), proc.stdout


def _worker_pids(agent: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun's agent ``agent`` started, read from /proc."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent:
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode().split("\0") if "=" in v)
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
        if "RANK" in env:
            workers[int(env["RANK"])] = int(entry.name)
    return workers


@pytest.mark.slow  # two pipeline runs on 2 ranks, one of them restarted
@pytest.mark.distributed
def test_killed_rank_restarts_and_ends_like_an_uninterrupted_run(tmp_path, checkpoint, reference):
    out = tmp_path / "elastic"
    cache = out / "curves" / "iter_01"
    cmd = torchrun_command(2, *_pipeline(out, f"model.checkpoint={checkpoint}", *TWO_ITERATIONS), max_restarts=1)
    log = open(tmp_path / "torchrun.log", "w+")
    agent = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (cache.is_dir() and any(cache.glob("*.curve.pt"))):
            assert agent.poll() is None and time.monotonic() < deadline, "the run ended before any curve piece was cached"
            time.sleep(0.02)
        victim = _worker_pids(agent.pid)[1]
        done = {p: p.stat().st_mtime_ns for p in cache.glob("*.curve.pt")}
        assert not (out / "allocation" / "iter_01.json").exists(), "curve estimation ended before the kill"
        os.kill(victim, signal.SIGKILL)
        assert agent.wait(timeout=240) == 0, (tmp_path / "torchrun.log").read_text()[-5000:]
    finally:
        if agent.poll() is None:
            agent.kill()
        log.close()
    assert victim not in _worker_pids(agent.pid)
    text = (tmp_path / "torchrun.log").read_text()
    assert "resuming" in text, text[-3000:]  # the restarted workers continued the run directory
    # Pieces cached before the kill were loaded, not recomputed; the rest are complete now.
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert sorted(p.name for p in cache.glob("*.curve.pt")) == sorted(p.name for p in (reference / "curves" / "iter_01").glob("*.curve.pt"))
    assert read_rows(out, timings=False) == read_rows(reference, timings=False)
    for t in (1, 2):
        assert _allocation(out, t) == _allocation(reference, t)
    assert _same_masks(_masks(out / "final" / "masks.pt"), _masks(reference / "final" / "masks.pt"))
    assert _same_masks(_masks(out / "checkpoints" / "last.pt"), _masks(reference / "checkpoints" / "last.pt"))


@pytest.mark.distributed
def test_a_rank_that_raises_ends_the_job_and_is_named(tmp_path):
    model = "model.name=dist_scripts.user_models:fails_on_rank_one"
    proc = _run(torchrun_command(2, *_pipeline(tmp_path / "run", model, "pretrain.steps=20")), timeout=180)
    assert proc.returncode != 0
    # Rank 0, left waiting in a collective, says which rank failed and why.
    assert "stopped because rank 1 failed: RuntimeError: deliberate failure in the user's forward" in proc.stderr, proc.stderr[-5000:]
    assert not (tmp_path / "run" / "pretrained.pt").exists()


@pytest.mark.distributed
def test_mismatched_configs_fail_on_every_rank_with_one_line(tmp_path):
    out = tmp_path / "run"
    proc = _run(torchrun_command(2, str(SCRIPTS / "run_per_rank.py"), QUICKSTART, f"run.out_dir={out}", *COMMON,
                          "finetune.lr=0.0{rank}5"), timeout=180)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rdprune: error: ")]
    assert len(errors) == 1, proc.stderr[-5000:]  # both ranks hold the same message: one shows it
    assert "ranks disagree on the resolved config: rank 0 " in errors[0] and "launch every node with the same config" in errors[0]
    assert "UserError" not in proc.stderr  # no traceback in torchrun's summary: the workers wrote no error file
    assert not (out / "results.jsonl").exists() and not (out / "config.yaml").exists()


@pytest.mark.distributed
def test_a_bad_config_under_torchrun_is_one_line_from_one_rank(tmp_path):
    proc = _run(torchrun_command(2, "-m", "rdprune.run", QUICKSTART, f"run.out_dir={tmp_path / 'run'}", *COMMON,
                                 "prune.levels=1"), timeout=180)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rdprune: error: ")]
    assert errors == ["rdprune: error: override 'prune.levels=1': prune.levels must be an integer >= 2, got 1"], proc.stderr
    assert "UserError" not in proc.stderr and "rdprune/config" not in proc.stderr, proc.stderr
    assert "error_file: <N/A>" in proc.stderr  # torchrun's summary has no worker traceback to quote
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # three ranks on a small machine, ~20-30 s
@pytest.mark.distributed
def test_idle_ranks_join_every_collective(tmp_path, checkpoint):
    # Only the head is pruned and its curve has two paid levels: the third rank gets no work.
    out = tmp_path / "run"
    overrides = [f"model.checkpoint={checkpoint}", "prune.skip=[features.0,features.4]", "prune.levels=3",
                 "prune.target_sparsity=0.15", "finetune.steps=2", "calibration.size=32"]
    proc = _ok(_run(torchrun_command(3, *_pipeline(out, *overrides))))
    assert "curve estimation: 2 pieces over 3 ranks" in proc.stderr, proc.stderr[-3000:]
    rows = read_rows(out, timings=False)
    assert [r["iteration"] for r in rows] == [0, 1] and rows[1]["sparsity"] >= 0.15 - 0.005
    masks = _masks(out / "final" / "masks.pt")
    head = masks["head"]
    # the middle of the head's three levels: half way to its floor (one weight per output unit kept)
    middle = pruned_count(0.5 * (1 - head.shape[0] / head.numel()), head.numel())
    assert int((~head).sum()) == middle
