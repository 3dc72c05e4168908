"""Atomic files: every file rdprune writes goes to a temporary name beside it, then a rename.

A killed run never leaves a half-written file. The temporary file is created private (mode 0600)
by ``mkstemp``; before the rename it gets the mode the user's umask gives any new file, so that
colleagues on a shared file system can read a run's results as they can read the user's other files.
It is flushed to disk (``fsync``) before the rename and the folder after it, so that a node that
fails after a write finds either the old file or the whole new one, never an empty one. A temporary
file left by a killed process is named ``.<name>.<8 random characters>.tmp``
(:func:`remove_leftovers` deletes those). A full disk, a missing permission or a read-only file
system is a :class:`~rdprune.errors.UserError` naming the file.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rdprune.errors import UserError

_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
"""The name ``mkstemp`` gives :func:`atomic_write`'s temporary file: ``.<name>.<8 characters>.tmp``."""
_USER_ERRNOS = {errno.ENOSPC: "free space there", errno.EDQUOT: "free space there (or raise the disk quota)",
                errno.EACCES: "allow writing there", errno.EPERM: "allow writing there",
                errno.EROFS: "choose a writable file system"}
"""The write errors a user fixes, and how."""

def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting and restoring it
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temporary path)``, give the file a normal file's mode, and rename it to ``path``.

    The file is on disk before the rename and the rename before the return (``fsync`` of both).
    ENOSPC, EDQUOT, EACCES, EPERM or EROFS becomes a one-line UserError naming ``path``.
    """
    path = Path(path)
    try:
        _atomic_write(path, write)
    except OSError as err:
        user = write_error(path, err)
        if user is None:
            raise
        raise user from err


def write_error(path: str | os.PathLike, err: OSError) -> UserError | None:
    """The one-line UserError for a failed write to ``path`` that the user can fix, or None for another error."""
    if err.errno not in _USER_ERRNOS:
        return None
    return UserError(f"cannot write {path}: {os.strerror(err.errno)}; {_USER_ERRNOS[err.errno]}, "
                     "or choose another folder (run.out_dir)")


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush a file, or a folder's entries (the rename), to disk."""
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError as err:
        # Some file systems cannot sync a folder (EINVAL): the rename then stands as the system keeps it.
        if not directory or err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def is_leftover(name: str) -> bool:
    """Whether a file name is that of :func:`atomic_write`'s temporary file."""
    return _TEMPORARY.fullmatch(name) is not None


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` that a killed process left under ``folder``
    (the whole tree), and return them. Call it only while no other process writes there (the run lock)."""
    removed = []
    for root, _, files in os.walk(folder):
        for name in files:
            if is_leftover(name):
                (Path(root) / name).unlink(missing_ok=True)
                removed.append(Path(root) / name)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` atomically.

    Through a Python file object: given a path, torch writes with its own C++ writer, which reports a
    full disk as a ``RuntimeError`` ("unexpected pos ...") without the cause; Python's file raises the
    ``OSError`` (ENOSPC) that :func:`atomic_write` turns into one line.
    """
    import torch  # here, not at the top: the config loader writes files too and must not import torch

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as err:
                raise (full_disk(tmp) or err) from err

    atomic_write(path, write)


def full_disk(path: str | os.PathLike, margin: int = 1 << 20) -> OSError | None:
    """ENOSPC for ``path`` if its file system has less than ``margin`` bytes free, else None: the cause of
    a write that failed without saying why (torch's and DeepSpeed's C++ writers raise ``RuntimeError``)."""
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) if free < margin else None


def read_error(path: str | os.PathLike, err: OSError) -> UserError | None:
    """The one-line UserError for a run file that cannot be read for a reason the user fixes
    (a permission), or None for another error."""
    if err.errno not in (errno.EACCES, errno.EPERM):
        return None
    return UserError(f"cannot read {path}: {os.strerror(err.errno)}; allow reading it (and the folders above it), "
                     "or choose another run.out_dir")
