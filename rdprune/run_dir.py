"""The run directory: an exclusive lock, atomic files, results.jsonl, provenance.

Everything here is written by rank 0 only, through a temporary name and a rename, so a killed run
never leaves a half-written file and a rerun can trust what it finds.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from rdprune.errors import UserError

RESULTS = "results.jsonl"
STATE_ENTRIES = ("results.jsonl", "checkpoints", "curves", "allocation", "plots", "final", "pretrained.pt")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class RunLock:
    """An exclusive advisory lock on ``out_dir/.lock``: two runs cannot write one directory at once."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"
        self._file = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
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
    present = [out_dir / e for e in STATE_ENTRIES if (out_dir / e).exists()]
    if not present:
        return None
    dest = out_dir / "archive" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for entry in present:
        shutil.move(str(entry), dest / entry.name)
    return dest


def read_results(out_dir: Path) -> list[dict]:
    """The completed iterations recorded so far (empty for a new run)."""
    path = out_dir / RESULTS
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number} is not JSON ({err.msg}); move the file away or set run.resume=false") from None
    return rows


def append_result(out_dir: Path, row: dict) -> None:
    """Append one iteration's row, rewriting the file atomically."""
    path = out_dir / RESULTS
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
    }
