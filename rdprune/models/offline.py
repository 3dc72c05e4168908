"""Local-only access to timm and Hugging Face models: optional imports, cache folders, offline mode.

rdprune never downloads a model: pretrained weights and Hugging Face folders come from the local
cache or a local path. The cache folders are read from the environment at call time (HF_HUB_CACHE,
HF_HOME, TORCH_HOME), so a cache copied from a machine with network is found wherever it is put.
"""
from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from rdprune.errors import UserError, one_line


def require_extra(module: str, model: str, extra: str) -> ModuleType:
    """Import optional dependency ``module`` for ``model``, or say which pip extra installs it."""
    package = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        absent = isinstance(exc, ModuleNotFoundError) and (exc.name or "").partition(".")[0] == package
        cause = "" if absent else f" ({one_line(exc)})"  # installed but broken: say why it failed
        raise UserError(f"model {model!r} needs {package}: pip install 'rdprune[{extra}]'{cause}") from exc


def hf_hub_cache() -> str:
    """The Hugging Face hub cache folder that the environment names now (as huggingface_hub resolves it)."""
    env = os.environ
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        folder = os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(folder))


def cached_hub_file(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """The local path of ``filename`` in hub repo ``repo_id`` if the cache holds it, else None (also for
    a string that is no valid repo id, and without huggingface_hub)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=hf_hub_cache(), revision=revision)
    except ValueError:  # huggingface_hub's HFValidationError: not of the form 'name' or 'namespace/name'
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


@contextmanager
def hub_offline() -> Iterator[None]:
    """Forbid Hugging Face hub requests inside the block (HF_HUB_OFFLINE=1), restoring the environment after.

    huggingface_hub reads HF_HUB_OFFLINE once, at import, so it is imported first and its flag is set
    for the block too.
    """
    try:
        constants: ModuleType | None = importlib.import_module("huggingface_hub.constants")
    except ImportError:
        constants = None
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    saved_flag = getattr(constants, "HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        if constants is not None and sys.modules.get("huggingface_hub.constants") is constants:
            constants.HF_HUB_OFFLINE = saved_flag
