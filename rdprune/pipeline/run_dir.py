"""The run directory: the layout that names every output path, an exclusive lock, results.jsonl, provenance.

Everything here is written by rank 0 only, atomically (:mod:`rdprune.files`), so a killed run
never leaves a half-written file and a rerun can trust what it finds.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import ClassVar

from rdprune.errors import UserError
from rdprune.files import atomic_write_text, read_error, write_error


@dataclass(frozen=True)
class RunLayout:
    """Every path of a run directory, named in this one place."""

    root: Path

    STATE: ClassVar[tuple[str, ...]] = ("results.jsonl", "checkpoints", "curves", "allocation", "plots", "final", "pretrained.pt",
                                         "latency_table.json")
    """Entries that make up a run's state: ``run.resume=false`` archives them."""

    def check(self) -> None:
        """A UserError if the directory cannot be one: it, or a folder above it, is a file."""
        for path in (self.root, *self.root.parents):
            if path.exists() and not path.is_dir():
                what = "run.out_dir" if path == self.root else f"a folder of run.out_dir {self.root}"
                raise UserError(f"{what} is {path}, an existing file; choose a folder for run.out_dir")
            if path.exists():
                return

    @property
    def results(self) -> Path:
        return self.root / "results.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def resume_key(self) -> Path:
        return self.root / "resume_key.json"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def pretrained(self) -> Path:
        """The dense model trained by ``pretrain`` (iteration 0 of a run without a checkpoint)."""
        return self.root / "pretrained.pt"

    @property
    def checkpoints(self) -> Path:
        """Mid-fine-tuning checkpoints and the last completed iteration's model."""
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    def allocation(self, iteration: int) -> Path:
        """The per-layer sparsity chosen at ``iteration``."""
        return self.root / "allocation" / f"iter_{iteration:02d}.json"

    def allocations(self) -> list[Path]:
        return sorted((self.root / "allocation").glob("iter_*.json"))

    def curve_cache(self, iteration: int) -> Path:
        """The curve cache of ``iteration`` (reused on resume)."""
        return self.root / "curves" / f"iter_{iteration:02d}"

    def curves(self, iteration: int) -> Path:
        """All curves of ``iteration`` in one ``.npz``."""
        return self.curve_cache(iteration) / "curves.npz"

    def all_curves(self) -> list[Path]:
        return sorted((self.root / "curves").glob("iter_*/curves.npz"))

    @property
    def final_model(self) -> Path:
        """The final plain state_dict (pruned weights zero) that loads into the unmodified architecture."""
        return self.final / "model.pt"

    @property
    def final_masks(self) -> Path:
        return self.final / "masks.pt"

    @property
    def final(self) -> Path:
        """The end of the run: the model, its masks, and what the granularity exports beside them."""
        return self.root / "final"

    @property
    def smaller_model(self) -> Path:
        """The physically smaller model a granularity exports (``torch.export``), beside ``model.onnx``."""
        return self.final / "smaller" / "model.pt2"

    def chosen(self, iteration: int) -> Path:
        """The choice made for ``iteration``, kept until the iteration is recorded.

        A measured latency budget makes the choice depend on timings; an iteration resumed after an
        interruption reuses this one, so its fine-tuning checkpoint and its masks stay consistent.
        """
        return self.root / "checkpoints" / f"removal_iter_{iteration:02d}.json"

    @property
    def latency_table(self) -> Path:
        """The latency model of a latency budget, built once and reused by a resumed run."""
        return self.root / "latency_table.json"

    def plot(self, name: str) -> Path:
        return self.root / "plots" / f"{name}.png"


class RunLock:
    """An exclusive advisory lock on ``out_dir/.lock``: two runs cannot write one directory at once."""

    def __init__(self, out_dir: Path):
        self.path = RunLayout(out_dir).lock
        self._file = None

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+")
        except OSError as err:  # a read-only or full run.out_dir fails here first
            user = write_error(self.path, err)
            if user is None:
                raise
            raise user from err
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise UserError(
                f"output directory {self.path.parent} is in use by {holder}; "
                "wait for it to finish or set run.out_dir to another folder"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {platform.node()}")
        self._file.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def archive_previous(out_dir: Path) -> Path | None:
    """Move an earlier run's state into ``out_dir/archive/<time>/`` (``run.resume=false``): nothing is lost."""
    layout = RunLayout(out_dir)
    present = [out_dir / e for e in layout.STATE if (out_dir / e).exists()]
    if not present:
        return None
    dest = layout.archive / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for entry in present:
        shutil.move(str(entry), dest / entry.name)
    return dest


def read_results(out_dir: Path) -> list[dict]:
    """The completed iterations recorded so far (empty for a new run)."""
    path = RunLayout(out_dir).results
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except OSError as err:
        user = read_error(path, err)
        if user is None:
            raise
        raise user from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not text ({err.reason}); move the file away or set run.resume=false") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number} is not JSON ({err.msg}); move the file away or set run.resume=false") from None
            if not isinstance(row, dict) or type(row.get("iteration")) is not int:
                raise UserError(f"{path} line {number} is not a result row (a JSON object with an integer \"iteration\"); "
                                "move the file away or set run.resume=false")
            if row["iteration"] != len(rows):
                raise UserError(f"{path} line {number} records iteration {row['iteration']} where iteration {len(rows)} "
                                "belongs; move the file away or set run.resume=false")
            rows.append(row)
    return rows


def append_result(out_dir: Path, row: dict) -> None:
    """Append one iteration's row, rewriting the file atomically."""
    path = RunLayout(out_dir).results
    text = path.read_text() if path.exists() else ""
    atomic_write_text(path, text + json.dumps(row, sort_keys=True) + "\n")


def provenance(config_hash: str, world_size: int) -> dict:
    """Package versions, git revision, host and the resolved config's hash, for the run directory."""
    versions = {}
    for pkg in ("rdprune", "torch", "torchvision", "numpy", "deepspeed", "nvidia-dali-cuda120"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        revision = None
    return {
        "config_hash": config_hash,
        "git_revision": revision,
        "versions": versions,
        "python": platform.python_version(),
        "host": platform.node(),
        "world_size": world_size,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "numerics": numerics(),
    }


NUMERICS_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")
"""Environment variables that choose the CPU kernels, and so the rounding, of a run."""


def numerics() -> dict:
    """What decides a CPU run's rounding besides the code and the seed: the CPU, the instruction set
    torch's kernels dispatch to, the thread count and the variables that pin them. Two runs agree
    bit for bit when these agree (see docs/quickstart.md, "Figures that reproduce")."""
    import torch

    return {
        "cpu": _cpu_name(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "env": {v: os.environ[v] for v in NUMERICS_VARIABLES if v in os.environ},
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
