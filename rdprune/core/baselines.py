"""Baseline allocations: ``unif``, ``unifplus``, ``glob``, ``lamp``, ``erk``.

Each returns ``{layer name: absolute amount}`` that :func:`rdprune.core.masks.apply_masks` turns into
magnitude masks. Targets count over the prunable layers plus ``dense_weights`` (skipped layers kept
dense), and are met to within one weight per layer. On an already-pruned model every baseline prunes
among the remaining weights: no layer's amount falls below its current sparsity.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn


BASELINES = ("lamp", "glob", "unif", "unifplus", "erk")


def baseline_amounts(
    method: str, layers: Mapping[str, nn.Module], target_sparsity: float, dense_weights: int = 0
) -> dict[str, float]:
    """Per-layer absolute amounts that ``method`` assigns to reach ``target_sparsity`` overall.

    ``layers`` should be in execution order (``describe_layers`` gives it): ``unifplus`` keeps the
    first conv dense and the last layer at 20 % or more.
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; allowed: {', '.join(BASELINES)}")
    if not layers:
        raise ValueError("no prunable layer to allocate")
    return _BASELINES[method](layers, target_sparsity, dense_weights)


def _prune_total(layers: Mapping[str, nn.Module], target: float, dense_weights: int) -> tuple[int, dict[str, int], dict[str, int]]:
    """Total count of weights the prunable layers must hold as zeros, plus sizes and current zero counts."""
    if not (isinstance(target, (int, float)) and 0.0 <= target < 1.0):
        raise ValueError(f"target sparsity must be a number in [0, 1), got {target!r}")
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    zeros = {n: int((m.weight == 0).sum()) for n, m in layers.items()}
    total = sum(sizes.values()) + dense_weights
    need = int(np.floor(target * total + 0.5))
    if need > sum(sizes.values()):
        raise ValueError(
            f"target sparsity {target} needs {need} zeros but the prunable layers hold only "
            f"{sum(sizes.values())} weights ({dense_weights} are in skipped layers)"
        )
    return max(need, sum(zeros.values())), sizes, zeros


def _water_fill(
    sizes: Mapping[str, int], lo: Mapping[str, int], hi: Mapping[str, int], pruned_at: Callable[[float], dict[str, float]], need: int
) -> dict[str, float]:
    """Find t in [0, 1] with sum of ``pruned_at(t)`` (clipped to [lo, hi]) equal to ``need``, then round.

    ``pruned_at`` must be non-decreasing in t. Rounding gives each layer an integer count within its
    bounds; the leftover is spread over the layers with the largest fractional parts, so the total is
    exact and each layer is within one weight of its continuous share.
    """
    if need > sum(hi.values()):
        raise ValueError(f"cannot prune {need} weights: the layers allow at most {sum(hi.values())} under this method")

    def clipped(t: float) -> dict[str, float]:
        raw = pruned_at(t)
        return {n: min(max(raw[n], lo[n]), hi[n]) for n in sizes}

    a, b = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (a + b)
        if sum(clipped(mid).values()) < need:
            a = mid
        else:
            b = mid
    share = clipped(b)
    counts = {n: int(np.floor(share[n])) for n in sizes}
    leftover = need - sum(counts.values())
    order = sorted(sizes, key=lambda n: (-(share[n] - counts[n]), n))
    for name in order:
        if leftover <= 0:
            break
        if counts[name] < hi[name]:
            counts[name] += 1
            leftover -= 1
    for name in order:  # floor can only undershoot, but a negative leftover must not go unnoticed
        if leftover >= 0:
            break
        if counts[name] > lo[name]:
            counts[name] -= 1
            leftover += 1
    return {n: counts[n] / sizes[n] for n in sizes}


def _uniform(layers: Mapping[str, nn.Module], target: float, dense: int, caps: Mapping[str, float] | None = None) -> dict[str, float]:
    need, sizes, zeros = _prune_total(layers, target, dense)
    caps = caps or {}
    hi = {n: max(zeros[n], int(np.floor(caps.get(n, 1.0) * sizes[n]))) for n in sizes}
    return _water_fill(sizes, zeros, hi, lambda t: {n: t * sizes[n] for n in sizes}, need)


def unif(layers: Mapping[str, nn.Module], target: float, dense_weights: int = 0) -> dict[str, float]:
    """The same fraction in every layer."""
    return _uniform(layers, target, dense_weights)


def unifplus(layers: Mapping[str, nn.Module], target: float, dense_weights: int = 0) -> dict[str, float]:
    """Uniform, except the first conv stays dense and the last layer keeps at least 20 % of its weights.

    First and last follow the order of ``layers`` (the first ``Conv2d``, the last prunable layer).
    """
    names = list(layers)
    caps = {names[-1]: 0.8}
    first_conv = next((n for n in names if isinstance(layers[n], nn.Conv2d)), None)
    if first_conv is not None:
        caps[first_conv] = 0.0
    return _uniform(layers, target, dense_weights, caps)


def erk(layers: Mapping[str, nn.Module], target: float, dense_weights: int = 0) -> dict[str, float]:
    """Erdős–Rényi-Kernel: density proportional to (sum of dims) / (product of dims).

    Layers whose density would exceed 1 (or their current density, as no layer may get denser)
    are capped there and the rest rescaled, which the water-filling does in one pass.
    """
    need, sizes, zeros = _prune_total(layers, target, dense_weights)
    score = {n: sum(m.weight.shape) / float(np.prod(m.weight.shape)) for n, m in layers.items()}
    top = max(score.values())
    # t = 0 keeps everything, t = 1 keeps nothing: the scale eps runs from inf down to 0.
    def pruned_at(t: float) -> dict[str, float]:
        eps = np.inf if t <= 0 else (1.0 - t) / t / top
        return {n: sizes[n] * (1.0 - min(1.0, eps * score[n])) for n in sizes}

    return _water_fill(sizes, zeros, sizes, pruned_at, need)


def _global_threshold(layers: Mapping[str, nn.Module], target: float, dense: int, score: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Prune the ``need`` lowest-scoring weights over all layers (ties broken by layer order, then index)."""
    need, sizes, _ = _prune_total(layers, target, dense)
    names = list(layers)
    scores = torch.cat([score(layers[n].weight.detach().flatten().double().cpu()) for n in names])
    owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([sizes[n] for n in names]))
    chosen = owner[torch.argsort(scores, stable=True)[:need]]
    counts = torch.bincount(chosen, minlength=len(names)).tolist()
    return {n: counts[i] / sizes[n] for i, n in enumerate(names)}


def _magnitude(w: torch.Tensor) -> torch.Tensor:
    return w.abs()


def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP score of each weight: w_u^2 / sum over weights at least as large of w_v^2 (0 for zeros)."""
    sq = w.double() ** 2
    order = torch.argsort(sq, stable=True)
    tail = torch.flip(torch.cumsum(torch.flip(sq[order], [0]), 0), [0])
    sorted_scores = torch.where(tail > 0, sq[order] / tail.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(tail))
    scores = torch.empty_like(sorted_scores)
    scores[order] = sorted_scores
    return scores


def glob(layers: Mapping[str, nn.Module], target: float, dense_weights: int = 0) -> dict[str, float]:
    """One global magnitude threshold."""
    return _global_threshold(layers, target, dense_weights, _magnitude)


def lamp(layers: Mapping[str, nn.Module], target: float, dense_weights: int = 0) -> dict[str, float]:
    """One global threshold on LAMP scores (Lee et al., ICLR'21)."""
    return _global_threshold(layers, target, dense_weights, lamp_scores)


_BASELINES = {"unif": unif, "unifplus": unifplus, "glob": glob, "lamp": lamp, "erk": erk}
