"""PNG plots of a run: RD curves, per-layer sparsity per iteration, top-1 against sparsity."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rdprune.core.grid import Curve  # noqa: E402
from rdprune.files import atomic_write  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Save a figure as PNG atomically and free it."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_curves(curves: Mapping[str, Curve], order: Sequence[str], path: Path, title: str) -> None:
    """Every layer's distortion against its absolute amount, coloured by depth (execution order)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("viridis")
    names = [n for n in order if n in curves]
    for i, name in enumerate(names):
        c = curves[name]
        # zero distortion (levels that prune nothing new) has no place on a log axis
        ax.plot(100 * c.amounts, np.where(c.distortion > 0, c.distortion, np.nan), color=cmap(i / max(1, len(names) - 1)), lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("layer sparsity (%)")
    ax.set_ylabel("output distortion")
    ax.set_title(title)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max(1, len(names) - 1)))
    fig.colorbar(sm, ax=ax, label="layer (execution order)")
    save_figure(fig, path)


def plot_layer_sparsity(allocations: Sequence[Mapping[str, float]], order: Sequence[str], path: Path, title: str) -> None:
    """Per-layer sparsity after each iteration, layers in execution order."""
    fig, ax = plt.subplots(figsize=(max(8, 0.15 * len(order)), 5))
    x = np.arange(len(order))
    for t, alloc in enumerate(allocations, 1):
        ax.plot(x, [100 * alloc.get(n, 0.0) for n in order], marker="o", ms=3, lw=1, label=f"iteration {t}")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    if len(order) <= 30:
        ax.set_xticks(x, order, rotation=90, fontsize=7)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def plot_accuracy(series: Mapping[str, Sequence[tuple[float, float]]], path: Path, title: str) -> None:
    """Top-1 against sparsity, one line per named series of (sparsity fraction, top-1 %) points."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, points in series.items():
        pts = sorted(points)
        ax.plot([100 * s for s, _ in pts], [a for _, a in pts], marker="o", label=label)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
