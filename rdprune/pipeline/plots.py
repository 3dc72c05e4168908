"""PNG plots of a run: RD curves, per-layer sparsity per iteration, top-1 against sparsity."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from rdprune.core.grid import Curve  # noqa: E402
from rdprune.files import atomic_write  # noqa: E402


def save_figure(fig: Figure, path: Path) -> None:
    """Save a figure as PNG atomically and free it (a figure made with pyplot is closed; one made as a
    plain ``Figure`` is not tracked by pyplot)."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


LEGEND_UNITS = 20
"""Up to this many units, the curves share one axes and a legend names each; more get one small panel each."""
_PANEL_COLUMNS = 8


def curves_figure(curves: Mapping[str, Curve], order: Sequence[str], title: str, *, unit: str = "layer") -> Figure:
    """Every unit's distortion against its absolute amount (units in execution order), each named.

    Up to ``LEGEND_UNITS`` units share one axes with a legend of their names; more get a grid of
    small panels, each titled by its unit's name, sharing both axes. ``unit`` names what a curve
    belongs to ("layer", "channel group", "2:4 layer") in the axis labels.
    """
    names = [n for n in order if n in curves]
    xlabel, ylabel = f"{unit} sparsity (%)", "output distortion"
    if len(names) <= LEGEND_UNITS:
        fig = Figure(figsize=(8 if len(names) <= 10 else 10, 5))
        ax = fig.subplots()
        colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
        for i, name in enumerate(names):
            ax.plot(*_points(curves[name]), color=colours[i], lw=1, label=name)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if names:
            ax.legend(title=f"{unit} (execution order)", fontsize=7, title_fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        return fig
    cols = min(_PANEL_COLUMNS, math.ceil(math.sqrt(len(names))))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(2.2 * cols, 1.8 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        ax.plot(*_points(curves[name]), lw=1)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    fig.suptitle(f"{title}\none panel per {unit}, in execution order", fontsize=10)
    fig.supxlabel(xlabel, fontsize=9)
    fig.supylabel(ylabel, fontsize=9)
    return fig


def _points(curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    """Sparsity in percent and distortion; zero distortion (levels that prune nothing new) has no place on a log axis."""
    return 100 * curve.amounts, np.where(curve.distortion > 0, curve.distortion, np.nan)


def plot_curves(curves: Mapping[str, Curve], order: Sequence[str], path: Path, title: str, *, unit: str = "layer") -> Figure:
    """:func:`curves_figure` saved as a PNG at ``path``; returns the (closed) figure."""
    fig = curves_figure(curves, order, title, unit=unit)
    save_figure(fig, path)
    return fig


def layer_sparsity_figure(allocations: Sequence[Mapping[str, float]], order: Sequence[str], title: str, *,
                          unit: str = "layer") -> Figure:
    """Each unit's sparsity after each iteration (one line per iteration), units in execution order and named on the axis."""
    fig = Figure(figsize=(max(8, 0.15 * len(order)), 5))
    ax = fig.subplots()
    x = np.arange(len(order))
    for t, alloc in enumerate(allocations, 1):
        ax.plot(x, [100 * alloc.get(n, 0.0) for n in order], marker="o", ms=3, lw=1, label=f"iteration {t}")
    ax.set_xlabel(f"{unit} (execution order)")
    ax.set_ylabel(f"{unit} sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.set_xticks(x, order, rotation=90, fontsize=7 if len(order) <= 30 else 6)  # the width grows with the count: names fit
    ax.legend(fontsize=7, ncol=2)
    return fig


def plot_layer_sparsity(allocations: Sequence[Mapping[str, float]], order: Sequence[str], path: Path, title: str, *,
                        unit: str = "layer") -> Figure:
    """:func:`layer_sparsity_figure` saved as a PNG at ``path``; returns the (closed) figure."""
    fig = layer_sparsity_figure(allocations, order, title, unit=unit)
    save_figure(fig, path)
    return fig


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
