"""Starting rdprune in subprocesses from tests: one clean environment and one torchrun command.

A test may itself run under torchrun or SLURM (a developer's shell, a CI job step): every launcher
variable is dropped, so each child starts a fresh world of its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SCRIPTS = TESTS / "dist_scripts"
LAUNCHER_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                     "ROLE_", "MASTER_", "SLURM_", "TORCHELASTIC_")


def clean_env(*paths: Path, **extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, one thread per process, the tests'
    helper modules and ``paths`` importable; ``extra`` set last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def torchrun_command(nproc: int, *target: str, max_restarts: int = 0) -> list[str]:
    """``torchrun --standalone`` of ``target`` (a script and its arguments, or ``-m module ...``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            f"--max-restarts={max_restarts}", "--monitor-interval=0.5", *target]


def torchrun(nproc: int, *target: str, timeout: float = 300, paths: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``target`` on ``nproc`` local ranks from the repository root; output captured as text."""
    return subprocess.run(torchrun_command(nproc, *target), env=clean_env(*paths), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def run_ok(cmd: list[str], timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root in :func:`clean_env` (or ``env``); assert it exits 0, showing its output if not."""
    proc = subprocess.run(cmd, cwd=REPO, env=env if env is not None else clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def read_rows(out: Path, *, timings: bool = True) -> list[dict]:
    """The rows of a run's results.jsonl; without ``timings`` (``seconds``), for comparing two runs."""
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return rows if timings else [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
