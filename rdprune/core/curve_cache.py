"""Per-layer curve cache: one file per layer (or level range), reused only for identical inputs.

Each file records a fingerprint of everything its values depend on (model state, calibration
inputs, grid, levels, distortion, layer, level range); a file whose fingerprint differs is stale
and is recomputed and overwritten, never reused.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rdprune.core.grid import Curve
from rdprune.files import atomic_torch_save

CACHE_FORMAT = 1


def _hash_tensor(h: hashlib._Hash, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())


def fingerprint_inputs(model: nn.Module, batches: Iterable[torch.Tensor]) -> str:
    """Hash of the model's class and full state and of the calibration batches (shapes and values)."""
    h = hashlib.sha256(f"rdprune-curves-{CACHE_FORMAT}:{type(model).__qualname__}".encode())
    for key, value in model.state_dict().items():
        h.update(key.encode())
        _hash_tensor(h, value)
    for batch in batches:
        h.update(b"batch")
        _hash_tensor(h, batch)
    return h.hexdigest()


class CurveCache:
    """Load and store finished curves under ``directory`` for one (model, inputs, settings) fingerprint."""

    def __init__(self, directory: str | os.PathLike, base_fingerprint: str, settings: str):
        self.directory = Path(directory)
        self.base = f"{base_fingerprint}:{settings}"

    def _key(self, layer: str, level_range: tuple[int, int] | None) -> tuple[Path, str]:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", layer) or "_"
        suffix = "" if level_range is None else f".levels{level_range[0]}-{level_range[1]}"
        fingerprint = hashlib.sha256(f"{self.base}:{layer}:{level_range}".encode()).hexdigest()
        # The fingerprint in the name too: runs sharing a cache folder (a sweep) keep each other's curves.
        return self.directory / f"{safe}{suffix}.{fingerprint[:12]}.curve.pt", fingerprint

    def load(self, layer: str, level_range: tuple[int, int] | None) -> Curve | None:
        """The cached curve, or None when there is none or it was computed for other inputs."""
        path, fingerprint = self._key(layer, level_range)
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a corrupt file is just recomputed
            return None
        if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
            return None
        return Curve(saved["amounts"].numpy(), saved["distortion"].numpy())

    def save(self, layer: str, level_range: tuple[int, int] | None, curve: Curve) -> None:
        path, fingerprint = self._key(layer, level_range)
        atomic_torch_save(
            {
                "fingerprint": fingerprint,
                "amounts": torch.from_numpy(np.ascontiguousarray(curve.amounts)),
                "distortion": torch.from_numpy(np.ascontiguousarray(curve.distortion)),
            },
            path,
        )
