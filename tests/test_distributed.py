"""rdprune.distributed under real torchrun on CPU (gloo), and at world size 1 in this process."""
import subprocess
from pathlib import Path

import pytest
import torch

from rdprune import distributed as d
from rdprune.distributed import collectives
from rdprune.errors import UserError

from launch import torchrun

SCRIPTS = Path(__file__).parent / "dist_scripts"


def run_script(script: str, nproc: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``dist_scripts/script`` on ``nproc`` local ranks under torchrun, one thread per rank."""
    return torchrun(nproc, str(SCRIPTS / script), *args, timeout=timeout)


def test_world_of_one_without_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    info = d.init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend, info.device) == (0, 1, None, torch.device("cpu"))
    assert d.broadcast_object("x") == "x" and d.gather_objects(3) == [3]
    assert torch.equal(d.all_reduce_sum(torch.tensor([2.0])), torch.tensor([2.0]))
    d.check_identical({"a": 1}, "anything")
    d.check_same_config("abc")
    model = torch.nn.Linear(2, 2)
    assert d.wrap_ddp(model, info) is model
    d.teardown()


@pytest.mark.distributed
def test_slurm_batch_script_without_srun_is_one_process(monkeypatch):
    # Inside sbatch but outside srun the allocation's task count must not be taken as the world.
    for var in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert d.init_distributed("cpu").world_size == 1


def test_slurm_step_environment_is_read():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_ID": "1234", "MASTER_ADDR": "10.0.0.7"}
    rank, world, local, extra = collectives._launch_env(env)
    assert (rank, world, local) == (5, 8, 1)
    assert extra == {"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": str(collectives.DEFAULT_MASTER_PORT + 1234)}
    # torchrun's variables win when srun launches torchrun.
    assert collectives._launch_env({**env, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"})[:3] == (2, 4, 2)


def test_bad_device_is_a_user_error():
    with pytest.raises(UserError, match="device must be one of"):
        d.init_distributed("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            d.init_distributed("cuda")


def test_fingerprint_is_by_content():
    a = {"w": torch.arange(6.0).view(2, 3).t(), "n": [1, "x"]}
    b = {"n": [1, "x"], "w": torch.arange(6.0).view(2, 3).t().contiguous()}
    assert d.fingerprint(a) == d.fingerprint(b)
    assert d.fingerprint(a) != d.fingerprint({**a, "n": [1, "y"]})
    assert d.fingerprint(torch.zeros(2)) != d.fingerprint(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="cannot fingerprint"):
        d.fingerprint(object())


def test_rank_prefix_in_logs(capsys):
    import logging

    d.setup_logging(3)
    logging.getLogger("rdprune.x").info("hidden on other ranks")
    logging.getLogger("rdprune.x").warning("shown")
    err = capsys.readouterr().err
    assert "[rank 3]" in err and "shown" in err and "hidden" not in err
    d.setup_logging(0)
    logging.getLogger("rdprune.x").info("rank zero info")
    err = capsys.readouterr().err
    assert "rank zero info" in err and "[rank" not in err


@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.distributed
def test_collectives_under_torchrun(nproc):
    out = run_script("collectives.py", nproc, str(nproc))
    assert out.returncode == 0, out.stdout + out.stderr
    assert all(f"collectives ok on rank {r}" in out.stdout for r in range(nproc))


@pytest.mark.distributed
def test_a_failing_rank_ends_the_job_and_every_rank_names_it():
    out = run_script("failing_rank.py", 3, "1", timeout=60)
    assert out.returncode != 0
    # The ranks left waiting in a barrier say who failed first and why, instead of hanging.
    for r in (0, 2):
        assert f"barrier on rank {r} stopped because rank 1 failed: RuntimeError: deliberate failure" in out.stderr, out.stderr


@pytest.mark.distributed
def test_mismatched_configs_fail_on_every_rank():
    out = run_script("config_mismatch.py", 2, timeout=60)
    assert out.returncode != 0
    assert out.stderr.count("ranks disagree on the resolved config: rank 0 ") == 2, out.stderr
    assert "launch every node with the same config and overrides" in out.stderr


def single_process_curves(grid: str, distortion: str) -> dict:
    from dist_scripts.sharded_curves import setup

    from rdprune.core.curves import estimate_curves

    model, inputs = setup()
    return estimate_curves(model, inputs, 11, grid=grid, worst_case=distortion == "worst_case",
                           measure="kl" if distortion == "kl" else "mse", batch_size=8, progress=False)


@pytest.mark.parametrize("nproc, grid, distortion", [(2, "relative", "mse"), (3, "absolute", "worst_case"), (2, "relative", "kl")])
@pytest.mark.distributed
def test_sharded_curves_equal_one_process(tmp_path, one_thread, nproc, grid, distortion):
    out = run_script("sharded_curves.py", nproc, str(tmp_path / "curves.pt"), "-", grid, distortion)
    assert out.returncode == 0, out.stdout + out.stderr
    sharded = torch.load(tmp_path / "curves.pt", weights_only=True)
    reference = single_process_curves(grid, distortion)
    assert list(sharded) == list(reference)
    scale = max(float(abs(c.distortion).max()) for c in reference.values())
    assert scale > 0
    for name, curve in reference.items():
        amounts, distortion = sharded[name]
        assert torch.equal(amounts, torch.from_numpy(curve.amounts)), name
        assert torch.allclose(distortion, torch.from_numpy(curve.distortion), rtol=0, atol=1e-6 * scale), name


@pytest.mark.distributed
def test_restart_recomputes_only_missing_pieces(tmp_path):
    cache = tmp_path / "cache"
    args = (str(tmp_path / "curves.pt"), str(cache), "relative", "mse")
    assert run_script("sharded_curves.py", 2, *args).returncode == 0
    files = sorted(cache.glob("*.curve.pt"))
    assert len(files) >= 5  # every layer, and at least one layer split between the ranks
    first = torch.load(tmp_path / "curves.pt", weights_only=True)
    lost = files[1]
    lost.unlink()  # a piece in flight when the job died
    kept = {f: f.stat().st_mtime_ns for f in files if f != lost}
    out = run_script("sharded_curves.py", 2, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert lost.exists() and {f: f.stat().st_mtime_ns for f in kept} == kept
    again = torch.load(tmp_path / "curves.pt", weights_only=True)
    assert all(torch.equal(first[n][1], again[n][1]) for n in first)


def test_deepspeed_settings_checked_before_any_work():
    from rdprune.training.deepspeed_engine import deepspeed_config

    cfg = deepspeed_config(2, "bf16", 64, 8, 1234)
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["reduce_bucket_size"] == cfg["zero_optimization"]["allgather_bucket_size"] == 4096
    assert deepspeed_config(2, "fp32", 64, 8, 10**10)["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert cfg["bf16"]["enabled"] and cfg["gradient_clipping"] == 0.0
    with pytest.raises(UserError, match="zero_stage must be one of 0, 1, 2"):
        deepspeed_config(3, "fp32", 64, 8, 1234)
    with pytest.raises(UserError, match="precision must be one of fp32, bf16"):
        deepspeed_config(1, "fp16", 64, 8, 1234)
    with pytest.raises(UserError, match="multiple of the number of ranks"):
        deepspeed_config(1, "fp32", 60, 8, 1234)


@pytest.mark.slow  # the first DeepSpeed start on a machine compiles an op (~35 s); then ~13 s each
@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (1, "fp32"), (2, "fp32")])
@pytest.mark.distributed
def test_deepspeed_keeps_zeros_and_ranks_equal(tmp_path, stage, precision):
    pytest.importorskip("deepspeed")
    out = run_script("deepspeed_masks.py", 2, str(stage), precision, str(tmp_path / "ckpt"), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert all(f"deepspeed zero {stage} {precision} ok on rank {r}" in out.stdout for r in (0, 1))
