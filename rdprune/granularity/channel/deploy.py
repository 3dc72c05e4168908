"""Which exported files are worth deploying: each format timed against the dense model in its own runtime.

The end of a channel run writes ``model.pt2`` (run by PyTorch: ``torch.export.load(path).module()``)
and ``model.onnx`` (run by ONNX Runtime). A smaller model is not always a faster file: a runtime may
pick a slower kernel for an odd channel count, or lose a fusion. :func:`time_formats` exports the
dense model alike and times each pruned file against the dense file of its format, interleaved, at
batch 1 and at the budget's batch; :func:`mark_deploy` marks ``deploy`` only the formats measured not
slower at every batch, and names the others with where they were slower.
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from rdprune.core.runtimes import Runtime

log = logging.getLogger(__name__)


def mark_deploy(timings: Mapping[str, Mapping[int, tuple[float, float]]], runtimes: Mapping[str, str] | None = None) -> dict:
    """The deploy marking of measured ``timings[format][batch] = (dense seconds, pruned seconds)``.

    A format is marked ``deploy`` when its pruned file is measured not slower (``pruned <= dense``) than the
    dense one at every batch timed. Returns ``{"formats": {format: {"runtime", "batches": {batch: {"dense_ms",
    "pruned_ms", "speedup"}}, "deploy", "slower_at"}}, "deploy": [formats], "slower": ["format (runtime) at batch
    b: 0.97x", ...]}``; batches are JSON keys (strings).
    """
    formats, deploy, slower = {}, [], []
    for fmt, by_batch in timings.items():
        runtime = (runtimes or {}).get(fmt)
        rows, slow = {}, []
        for batch, (dense_s, pruned_s) in sorted(by_batch.items()):
            rows[str(batch)] = {"dense_ms": 1e3 * dense_s, "pruned_ms": 1e3 * pruned_s, "speedup": dense_s / pruned_s}
            if pruned_s > dense_s:
                slow.append(batch)
                slower.append(f"{fmt}{f' ({runtime})' if runtime else ''} at batch {batch}: {dense_s / pruned_s:.2f}x")
        ok = bool(by_batch) and not slow
        formats[fmt] = {"runtime": runtime, "batches": rows, "deploy": ok, "slower_at": slow}
        if ok:
            deploy.append(fmt)
    return {"formats": formats, "deploy": deploy, "slower": slower}


def summary_line(marking: Mapping) -> str:
    """One line for the log: what to deploy, and which formats were slower where."""
    deploy = ", ".join(marking["deploy"]) or "none"
    slower = "; ".join(marking["slower"])
    return f"deploy: {deploy}" + (f"; slower than dense: {slower}" if slower else "")


def time_formats(dense: nn.Module, paths: Mapping[str, Path], example: torch.Tensor, batches: Sequence[int],
                 runtimes: Mapping[str, Runtime], repeats: int) -> dict[str, dict[int, tuple[float, float]]]:
    """(dense, pruned) median seconds of each format's file at each batch, in the runtime that runs the format.

    ``paths[format]`` is the pruned file; the dense model is exported alike (``save_exported``) to a temporary
    directory, so that both sides run as files. ``example`` holds at least ``max(batches)`` samples.
    """
    from rdprune.granularity.channel.export import save_exported

    timings: dict[str, dict[int, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="rdprune-dense-") as tmp:
        dense_paths = save_exported(dense.cpu().eval(), example[:1].cpu(), tmp)
        for fmt, path in paths.items():
            runtime = runtimes[fmt]
            for batch in dict.fromkeys(batches):
                x = example[:batch]
                calls = [runtime.file_call(dense_paths[fmt], x), runtime.file_call(path, x)]
                dense_s, pruned_s = runtime.medians(calls, repeats)
                timings.setdefault(fmt, {})[batch] = (dense_s, pruned_s)
    return timings
