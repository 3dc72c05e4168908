"""Mid-fine-tuning checkpoints: where each engine writes them, which one a rerun may resume from.

The plain/DDP engine's rank 0 writes ``checkpoints/finetune.pt`` (model, optimizer, scheduler and
every rank's random state). DeepSpeed's engine has every rank write DeepSpeed's own sharded
checkpoint under ``checkpoints/deepspeed/<tag>``, then rank 0 writes ``checkpoints/finetune.json``
naming the tag: the marker appears only once the checkpoint is whole. Both record the iteration,
the step, the engine and the world size; a checkpoint that differs from the current fine-tuning in
any of them is stale and is removed.
"""
from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import torch

from rdprune import distributed
from rdprune.distributed import DistInfo
from rdprune.errors import UserError, one_line
from rdprune.files import read_error

log = logging.getLogger(__name__)

LOCAL_FILE = "finetune.pt"
DEEPSPEED_MARKER = "finetune.json"
DEEPSPEED_DIR = "deepspeed"


def deepspeed_tag(iteration: int, step: int) -> str:
    """The name of one DeepSpeed checkpoint: a new one per save, so a kill mid-save spares the last whole one."""
    return f"iter{iteration:02d}_step{step:07d}"


_KEYS = ("engine", "world_size", "iteration", "step")


def _present(directory: Path) -> list[dict]:
    """What each checkpoint present records: engine, world_size, iteration, step.

    One that cannot be read (damaged: every write is atomic, so not by a kill) is reported as
    ``{"engine": ..., "unreadable": reason}``: the caller removes it, and the iteration's
    fine-tuning restarts from its beginning, which gives the same result.
    """
    found = []
    if (directory / LOCAL_FILE).exists():
        try:
            # mmap: only the few plain entries are read, not the model and optimizer tensors.
            state = torch.load(directory / LOCAL_FILE, map_location="cpu", weights_only=True, mmap=True)
            found.append({k: state[k] for k in _KEYS})
        except Exception as err:  # torch.load meets damaged bytes with many exception types
            _unreadable(directory / LOCAL_FILE, err)
            found.append({"engine": "ddp", "unreadable": one_line(err)})
    if (directory / DEEPSPEED_MARKER).exists():
        try:
            marker = json.loads((directory / DEEPSPEED_MARKER).read_text())
            found.append({**{k: marker[k] for k in _KEYS}, "tag": str(marker["tag"])})
        except (ValueError, OSError, KeyError, TypeError) as err:
            _unreadable(directory / DEEPSPEED_MARKER, err)
            found.append({"engine": "deepspeed", "unreadable": one_line(err)})
    return found


def _unreadable(path: Path, err: BaseException) -> None:
    """A permission error is the user's to fix (one line); any other read error means a damaged file."""
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM):
        raise read_error(path, err) from None


def remove(directory: Path, engine: str | None = None) -> None:
    """Delete ``engine``'s mid-fine-tuning checkpoint under ``directory`` (None: both; call on rank 0)."""
    if engine in (None, "deepspeed"):
        (directory / DEEPSPEED_MARKER).unlink(missing_ok=True)  # first: a marker never names a missing checkpoint
        shutil.rmtree(directory / DEEPSPEED_DIR, ignore_errors=True)
    if engine in (None, "ddp"):
        (directory / LOCAL_FILE).unlink(missing_ok=True)


def resume_step(directory: Path, iteration: int, engine: str, dist: DistInfo) -> int:
    """The step to resume ``iteration``'s fine-tuning from (0 = from the start), the same on every rank.

    Rank 0 decides: a checkpoint of this iteration, engine and world size is used; any other is
    removed, so it cannot be taken for a later iteration's.
    """
    step = 0
    if dist.is_main:
        wanted = {"engine": engine, "world_size": dist.world_size, "iteration": iteration}
        for found in _present(directory):
            if "unreadable" in found:
                log.warning("removing an unreadable fine-tuning checkpoint (%s, %s): iteration %d's fine-tuning "
                            "restarts from its beginning", found["engine"], found["unreadable"], iteration)
            elif {k: found.get(k) for k in wanted} == wanted:
                step = found["step"]
                continue
            else:
                log.info("removing a fine-tuning checkpoint of another run state (%s, iteration %s, %s ranks)",
                         found.get("engine"), found.get("iteration"), found.get("world_size"))
            remove(directory, found.get("engine"))
    return distributed.broadcast_object(step)


def load_run_state(path: Path, device: torch.device | str) -> dict:
    """A run's ``pretrained.pt`` or ``checkpoints/last.pt`` as saved (``{"model": state_dict, ...}``).

    A file that does not load (truncated by a kill or a full disk, or not a checkpoint at all) is a
    one-line UserError naming it, not torch's traceback.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except torch.OutOfMemoryError:
        raise
    # a truncated zip archive (RuntimeError), an empty file (EOFError), other bytes (UnpicklingError, or whatever
    # the weights-only unpickler meets in random bytes: IndexError, KeyError, ...), a read error
    except Exception as err:
        raise UserError(f"{path} is not a readable checkpoint ({one_line(err)}); a killed run or a full disk may "
                        "have cut it short: set run.resume=false to archive this run and start clean") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path} is not a checkpoint of this run (no \"model\" state_dict); "
                        "set run.resume=false to archive this run and start clean")
    return state
