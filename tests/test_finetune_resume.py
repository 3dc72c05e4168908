"""Mid-fine-tuning checkpoints (``finetune.checkpoint_every``): a run killed while fine-tuning
continues from its last checkpoint and ends exactly like an uninterrupted run, with either engine."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from rdprune.config import FinetuneConfig
from rdprune.core.layers import prunable_layers
from rdprune.core.masks import apply_masks
from rdprune.distributed import DistInfo
from rdprune.training import checkpoint as finetune_checkpoint
from rdprune.training.engine import train_steps
from rdprune.training.local_engine import LocalEngine
from rdprune.training.optim import make_optimizer, make_scheduler

from launch import clean_env, read_rows, run_ok, torchrun_command

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
REDUCED = ["pretrain.steps=40", "finetune.steps=30", "prune.levels=6", "prune.target_sparsity=0.75",
           "calibration.size=32", "run.progress=false", "run.threads=1"]
RESUMED = re.compile(r"iteration (\d+): resumed fine-tuning at step (\d+) of 30")


class DropoutNet(nn.Module):
    """Dropout and BatchNorm: a resumed run must restore random state and buffers, not only weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))))


def _batches():
    """Fixed batches plus noise from the global generator, as random augmentation draws it."""
    g = torch.Generator().manual_seed(7)
    while True:
        x = torch.randn(8, 3, 6, 6, generator=g)
        yield x + 0.1 * torch.randn_like(x), torch.randint(0, 5, (8,), generator=g)


def _engine(precision: str = "fp32"):
    torch.manual_seed(0)
    model = DropoutNet()
    layers = prunable_layers(model)
    masks = apply_masks(model, {n: 0.5 for n in layers}, layers)
    section = FinetuneConfig(steps=10, lr=0.05)
    optimizer = make_optimizer(model, section)
    engine = LocalEngine(model, optimizer, make_scheduler(optimizer, section, 10), DistInfo(), layers=layers, masks=masks,
                         precision=precision)
    return model, masks, engine


def test_local_engine_resumes_exactly(one_thread, tmp_path):
    model, _, engine = _engine()
    train_steps(engine, _batches(), 10, progress=False)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model, _, engine = _engine()
    train_steps(engine, _batches(), 10, every=4, progress=False, checkpoint=lambda step: engine.save(tmp_path, 2, step))
    assert all(torch.equal(straight[k], v) for k, v in model.state_dict().items()), "checkpointing changed training"
    assert finetune_checkpoint.resume_step(tmp_path, 2, "ddp", DistInfo()) == 8  # the last save before the end

    model, masks, engine = _engine()
    batches = _batches()
    for _ in range(8):
        next(batches)
    torch.manual_seed(123)  # whatever the random state now, the checkpoint's must win
    assert engine.load(tmp_path) == 8
    train_steps(engine, batches, 10, start=8, progress=False)
    assert all(torch.equal(straight[k], v) for k, v in model.state_dict().items()), "resumed training differs"
    layers = prunable_layers(model)
    assert all(torch.all(layers[n].weight[~m] == 0) for n, m in masks.items())


def test_only_a_checkpoint_of_this_iteration_engine_and_world_size_is_used(tmp_path):
    _, _, engine = _engine()
    engine.save(tmp_path, 1, 4)
    assert finetune_checkpoint.resume_step(tmp_path, 1, "ddp", DistInfo()) == 4
    assert (tmp_path / "finetune.pt").exists()
    assert finetune_checkpoint.resume_step(tmp_path, 2, "ddp", DistInfo()) == 0  # another iteration's
    assert not (tmp_path / "finetune.pt").exists()

    def deepspeed_checkpoint(iteration, world_size):
        (tmp_path / "deepspeed" / "tag").mkdir(parents=True, exist_ok=True)
        (tmp_path / "finetune.json").write_text(json.dumps(
            {"engine": "deepspeed", "world_size": world_size, "iteration": iteration, "step": 6, "tag": "tag"}))

    deepspeed_checkpoint(1, 1)
    engine.save(tmp_path, 1, 4)
    assert finetune_checkpoint.resume_step(tmp_path, 1, "deepspeed", DistInfo()) == 6
    assert not (tmp_path / "finetune.pt").exists()  # the other engine's
    assert finetune_checkpoint.resume_step(tmp_path, 1, "ddp", DistInfo()) == 0
    assert not (tmp_path / "finetune.json").exists() and not (tmp_path / "deepspeed").exists()
    deepspeed_checkpoint(1, 2)  # written by two ranks, resumed by one
    assert finetune_checkpoint.resume_step(tmp_path, 1, "deepspeed", DistInfo()) == 0
    assert not (tmp_path / "finetune.json").exists()




def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) if entry.name.isdigit() else None
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _kill_when_written(cmd: list[str], marker: Path, log: Path) -> None:
    """Start ``cmd`` and SIGKILL it and every process it started once ``marker`` exists."""
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 500
            while not marker.exists():
                assert proc.poll() is None and time.monotonic() < deadline, \
                    "the run ended before it wrote a fine-tuning checkpoint:\n" + log.read_text()[-3000:]
                time.sleep(0.02)
        finally:
            for pid in [proc.pid, *_descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()


def _check_resumed(out: Path, proc: subprocess.CompletedProcess, reference: Path) -> None:
    resumed = RESUMED.findall(proc.stderr)
    assert len(resumed) == 1, proc.stderr[-3000:]
    iteration, step = map(int, resumed[0])
    assert iteration in (1, 2) and 0 < step < 30 and step % 5 == 0
    assert read_rows(out, timings=False) == read_rows(reference, timings=False)
    assert not any(p.name.startswith("finetune") for p in (out / "checkpoints").iterdir())
    assert not (out / "checkpoints" / "deepspeed").exists()
    final, ref = (torch.load(p / "final" / "model.pt", weights_only=True) for p in (out, reference))
    assert all(torch.equal(final[k], ref[k]) for k in ref)


@pytest.mark.slow  # three quickstart runs, ~20 s each
def test_killed_during_finetuning_resumes_at_the_checkpoint(tmp_path):
    def command(out):
        return [sys.executable, "-m", "rdprune.run", QUICKSTART, f"run.out_dir={out}", *REDUCED, "finetune.checkpoint_every=5"]

    reference = tmp_path / "reference"
    run_ok([sys.executable, "-m", "rdprune.run", QUICKSTART, f"run.out_dir={reference}", *REDUCED])  # no checkpoints
    assert [r["iteration"] for r in read_rows(reference, timings=False)] == [0, 1, 2]
    out = tmp_path / "run"
    _kill_when_written(command(out), out / "checkpoints" / "finetune.pt", tmp_path / "killed.log")
    saved = torch.load(out / "checkpoints" / "finetune.pt", weights_only=True)
    assert saved["iteration"] in (1, 2) and 0 < saved["step"] < 30
    _check_resumed(out, run_ok(command(out)), reference)


@pytest.mark.slow  # DDP ~15 s a run; DeepSpeed starts slowly (a minute or more on a loaded 2-core machine)
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
@pytest.mark.distributed
def test_torchrun_killed_during_finetuning_resumes_from_the_checkpoint(tmp_path, engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    pretrained = tmp_path / "pretrain"
    run_ok([sys.executable, "-m", "rdprune.run", QUICKSTART, f"run.out_dir={pretrained}", *REDUCED,
          "prune.method=glob", "prune.target_sparsity=0.5", "finetune.steps=0"])
    settings = ["distributed.engine=deepspeed", "distributed.zero_stage=2"] if engine == "deepspeed" else []

    def command(out, *extra):
        return [*torchrun_command(2, "-m", "rdprune.run"), QUICKSTART, f"run.out_dir={out}", *REDUCED,
                f"model.checkpoint={pretrained / 'pretrained.pt'}", *settings, "distributed.curve_threads=1",
                "distributed.timeout_s=300", *extra]

    reference = tmp_path / "reference"
    run_ok(command(reference))
    out = tmp_path / "run"
    marker = out / "checkpoints" / ("finetune.json" if engine == "deepspeed" else "finetune.pt")
    _kill_when_written(command(out, "finetune.checkpoint_every=5"), marker, tmp_path / "killed.log")
    if engine == "deepspeed":
        saved = json.loads(marker.read_text())
        # every rank wrote its shard of the optimizer state
        shards = sorted(p.name for p in (out / "checkpoints" / "deepspeed" / saved["tag"]).glob("*optim_states.pt"))
        assert len(shards) == 2, shards
    else:
        saved = torch.load(marker, weights_only=True)
        assert len(saved["rng"]) == 2  # both ranks' random states
    assert saved["engine"] == engine and saved["world_size"] == 2 and saved["iteration"] in (1, 2)
    _check_resumed(out, run_ok(command(out, "finetune.checkpoint_every=5")), reference)


def test_bf16_autocast_keeps_fp32_weights_and_zeros(one_thread):
    """distributed.precision bf16 under the ddp engine: the forward runs in bf16 (so training differs
    from fp32), the weights stay fp32 and pruned weights stay exactly zero."""
    def trained(precision: str) -> tuple[nn.Module, dict]:
        model, masks, engine = _engine(precision)
        train_steps(engine, _batches(), 5, progress=False)
        return model, masks

    model16, masks = trained("bf16")
    model32, _ = trained("fp32")
    assert all(p.dtype == torch.float32 for p in model16.parameters())
    layers = prunable_layers(model16)
    assert all(torch.all(layers[n].weight[~mask] == 0) for n, mask in masks.items())
    assert not torch.equal(model16.conv.weight, model32.conv.weight)
