"""2:4 semi-structured sparsity as a granularity: which Linear layers go 2:4, chosen by rate-distortion.

In a 2:4 layer every group of 4 consecutive weights along the input dimension keeps at most 2
non-zeros; GPUs from compute capability 8.0 multiply such a weight about twice as fast
(``torch.sparse.to_sparse_semi_structured``). Making every layer 2:4 costs too much accuracy, so
each candidate layer is a *unit* with two levels, dense (amount 0) and 2:4 (amount 0.5), and the
same engine and allocator as every other granularity choose which layers go 2:4 under a budget:

- the curves are exact (:func:`estimate_two_four_curves` runs the shared engine
  :func:`rdprune.core.curves.unit_curves`, :func:`plain_two_four_curves` is the definition run
  literally); a layer that is 2:4 already has both points equal (it has nothing left to lose);
- the costs are integers per level (:class:`TwoFourCost`): surviving weights, layers left dense, or
  measured microseconds; :func:`allocate_two_four` solves the choice exactly with
  :func:`rdprune.core.allocation.allocate_levels`, :func:`glob_two_four` is the baseline.

**Candidates.** ``nn.Linear`` layers whose weight (out_features x in_features) the bf16/fp16 kernels
of both PyTorch backends accept: the CUTLASS rule, out_features a multiple of 32 and in_features a
multiple of 64 (cuSPARSELt asks only 16 and 16, so the CUTLASS rule works with either backend,
whichever ``to_sparse_semi_structured`` picks). The classifier is not special: it is a candidate
when its shape is accepted (a 10- or 1000-class head is not), and RD prices its distortion like any
other layer's; ``prune.skip`` keeps it dense.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rdprune.core.allocation import Allocation, allocate_levels, predicted_distortion
from rdprune.core.curves import UnitPlan, as_batches, curve_cache, plain_unit_curves, select_units, unit_curves
from rdprune.core.distortion import Distortion, Measure
from rdprune.core.grid import Curve
from rdprune.core.layers import prunable_layers

log = logging.getLogger(__name__)

ROWS_MULTIPLE, COLS_MULTIPLE = 32, 64
"""CUTLASS's bf16/fp16 minimum sparse block (``SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS``):
a weight's rows (out_features) and columns (in_features) must be multiples of these."""
AMOUNTS = np.array([0.0, 0.5])
"""The two levels of every 2:4 unit: dense, and half of its weights pruned."""
SEMI_STRUCTURED_BUDGETS = ("weights", "layers", "latency")


def candidates(model: nn.Module, skip: Iterable[str] = ()) -> tuple[dict[str, nn.Linear], list[tuple[str, str]]]:
    """The layers that may go 2:4, in declaration order, and the prunable layers left out with the reason.

    A prunable layer (``nn.Conv2d`` or ``nn.Linear``, ``skip`` excluded) is a candidate when it is a
    plain ``nn.Linear`` (its forward is ``nn.Linear.forward``, so ``F.linear`` dispatches to the 2:4
    kernel) outside ``nn.MultiheadAttention`` (whose fused path reads the weight directly) with an
    accepted shape (module notes). An empty result is for the caller to report.
    """
    found, left_out = {}, []
    attention = {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                 for c, _ in m.named_modules() if c}
    for name, module in prunable_layers(model, skip).items():
        if not isinstance(module, nn.Linear):
            left_out.append((name, f"{type(module).__name__}: 2:4 kernels serve nn.Linear layers only"))
        elif name in attention:
            left_out.append((name, "inside nn.MultiheadAttention, whose fused kernel reads the weight directly"))
        elif type(module).forward is not nn.Linear.forward:
            left_out.append((name, f"{type(module).__name__} overrides nn.Linear.forward"))
        elif not shape_accepted(module.weight.shape):
            out_f, in_f = module.weight.shape
            left_out.append((name, f"weight {out_f}x{in_f}: 2:4 kernels need out_features a multiple of {ROWS_MULTIPLE} "
                                   f"and in_features a multiple of {COLS_MULTIPLE}"))
        else:
            found[name] = module
    return found, left_out


def shape_accepted(shape: Sequence[int]) -> bool:
    """Whether a Linear weight of ``shape`` (out_features, in_features) can be made 2:4 (module notes)."""
    return len(shape) == 2 and shape[0] > 0 and shape[1] > 0 and shape[0] % ROWS_MULTIPLE == 0 and shape[1] % COLS_MULTIPLE == 0


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep-mask with the 2 largest |w| of every group of 4 consecutive weights along the input dimension.

    ``weight`` is (out_features, in_features) with in_features a multiple of 4. Ties go to the
    earlier position in the group, so the mask is deterministic.
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"a 2:4 mask needs a 2-d weight whose second dimension is a multiple of 4, got {tuple(weight.shape)}")
    groups = weight.detach().abs().reshape(weight.shape[0], -1, 4)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :2], True)
    return keep.reshape(weight.shape)


def is_two_four(tensor: torch.Tensor) -> bool:
    """Whether a keep-mask (bool) or a weight (its non-zeros) has at most 2 of every 4 along the input dimension."""
    if tensor.dim() != 2 or tensor.shape[1] % 4:
        return False
    kept = tensor if tensor.dtype == torch.bool else tensor.detach() != 0
    return bool((kept.reshape(tensor.shape[0], -1, 4).sum(dim=-1) <= 2).all())


class TwoFourUnit:
    """One candidate layer as a pruning unit: its only pruned level applies the 2:4 mask of its current weight."""

    kind = "2:4 layer"

    def __init__(self, name: str, module: nn.Linear):
        self.name, self.modules = name, (module,)
        self._weight = module.weight

    def hold(self) -> None:
        self._original = self._weight.detach().clone()

    def prune(self, count: int) -> None:
        # Two levels (unit_plan): count 0 is the dense weight, half the weights is the 2:4 mask.
        self._weight.copy_(self._original * two_four_mask(self._original) if count else self._original)

    def restore(self) -> None:
        self._weight.copy_(self._original)
        del self._original


def unit_plan(module: nn.Linear, level_range: tuple[int, int] | None = None) -> UnitPlan:
    """The two levels of a candidate (counts in pruned weights); a layer already 2:4 counts as pruned at both."""
    n = module.weight.numel()
    counts = [0, n // 2]
    amounts = AMOUNTS
    if level_range is not None:
        start, stop = level_range
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= 2):
            raise ValueError(f"level range of a 2:4 unit must satisfy 0 <= start < stop <= 2, got {level_range}")
        counts, amounts = counts[start:stop], amounts[start:stop]
    return UnitPlan(amounts, counts, n // 2 if is_two_four(module.weight) else 0, level_range)


def estimate_two_four_curves(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    inputs: torch.Tensor | Iterable[torch.Tensor],
    *,
    worst_case: bool = False,
    measure: Measure = "mse",
    units: Iterable[str] | None = None,
    level_ranges: Mapping[str, tuple[int, int]] | None = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Curve]:
    """Curve of each candidate in ``layers`` (``units``: a subset, e.g. one rank's shard): distortion dense and 2:4.

    Through the shared engine: only what depends on the layer is re-run, a layer already 2:4 costs
    no forward pass, and with ``cache_dir`` each finished layer is saved and reused by a later call
    with identical model, inputs and settings. The model is left exactly as it was.
    """
    chosen = select_units(layers, units, "2:4 candidates")
    batches = as_batches(inputs, batch_size)
    ranges = dict(level_ranges or {})
    plans = {n: (TwoFourUnit(n, layers[n]), unit_plan(layers[n], ranges.get(n))) for n in chosen}
    distortion = Distortion(measure, worst_case)
    cache = curve_cache(cache_dir, model, batches, f"granularity=semi_structured:pattern=2:4:{distortion.cache_key}")
    return unit_curves(model, layers.values(), plans, batches, distortion, cache, progress)


def plain_two_four_curves(
    model: nn.Module, layers: Mapping[str, nn.Linear], inputs: torch.Tensor | Iterable[torch.Tensor], *,
    worst_case: bool = False, measure: Measure = "mse", batch_size: int = 64,
) -> dict[str, Curve]:
    """The definition run literally: for every candidate, apply its 2:4 mask, run the whole model, compare."""
    units = {n: (TwoFourUnit(n, m), unit_plan(m)) for n, m in layers.items()}
    return plain_unit_curves(model, units, as_batches(inputs, batch_size), Distortion(measure, worst_case))


def current_two_four(layers: Mapping[str, nn.Linear]) -> list[str]:
    """The candidates whose weights are 2:4 now (from an earlier iteration, or given so)."""
    return [n for n, m in layers.items() if is_two_four(m.weight)]


@dataclass(frozen=True)
class TwoFourCost:
    """What a choice of 2:4 layers costs under one budget, in integers.

    ``dense[l]`` and ``sparse[l]`` are candidate l's cost at each level; ``total`` is the whole
    model's dense cost, the unit of ``target_sparsity``; ``fixed`` is what no choice changes (the
    weights of the other prunable layers, or the model's latency outside the candidates'
    savings), so a choice S costs ``fixed + sum_l (sparse if l in S else dense)``.
    """

    budget: str
    dense: dict[str, int]
    sparse: dict[str, int]
    total: int
    fixed: int

    def __post_init__(self) -> None:
        if self.budget not in SEMI_STRUCTURED_BUDGETS:
            raise ValueError(f"2:4 budget must be one of {SEMI_STRUCTURED_BUDGETS}, got {self.budget!r}")
        if list(self.dense) != list(self.sparse) or any(self.sparse[n] > self.dense[n] or self.sparse[n] < 0 for n in self.dense):
            raise ValueError("2:4 costs need the same layers at both levels, 0 <= cost at 2:4 <= cost dense")
        if self.total <= 0:
            raise ValueError(f"the model's dense cost must be positive, got {self.total}")
        if self.fixed < 0:
            raise ValueError(f"the cost no choice changes must be >= 0, got {self.fixed}: the total (e.g. total_weights) "
                             "must include the candidates' own costs")

    def __call__(self, two_four: Iterable[str]) -> int:
        chosen = set(two_four)
        return self.fixed + sum(self.sparse[n] if n in chosen else self.dense[n] for n in self.dense)

    def limit(self, target: float) -> int:
        """The most the candidates may cost together at ``target`` (the fraction of ``total`` removed)."""
        return math.floor((1.0 - target) * self.total + 1e-9) - self.fixed

    @property
    def reachable(self) -> float:
        """The largest target met with every candidate 2:4."""
        return 1.0 - self(self.dense) / self.total

    def level_costs(self) -> dict[str, np.ndarray]:
        """Per candidate, the costs of its two levels as ``allocate_levels`` takes them."""
        return {n: np.array([self.dense[n], self.sparse[n]], np.int64) for n in self.dense}


def weight_cost(layers: Mapping[str, nn.Linear], total_weights: int) -> TwoFourCost:
    """Surviving weights: a 2:4 layer keeps half of its weights; ``total_weights`` counts every prunable layer."""
    dense = {n: m.weight.numel() for n, m in layers.items()}
    return TwoFourCost("weights", dense, {n: s - s // 2 for n, s in dense.items()}, total_weights,
                       total_weights - sum(dense.values()))


def layer_cost(layers: Iterable[str]) -> TwoFourCost:
    """Layers left dense: ``target_sparsity`` is the fraction of the candidates made 2:4."""
    names = list(layers)
    return TwoFourCost("layers", dict.fromkeys(names, 1), dict.fromkeys(names, 0), len(names), 0)


def latency_cost(dense_us: Mapping[str, int], sparse_us: Mapping[str, int], model_us: int) -> TwoFourCost:
    """Measured microseconds: the model's dense latency less what each 2:4 layer saves, savings taken as additive.

    The layers, timed one by one, may add up to more than the whole model timed at once (launch
    overheads overlap there); the model then counts as the sum, so no choice can cost below zero.
    """
    if sum(dense_us.values()) > model_us:
        log.warning("the 2:4 candidates timed one by one take %d us, more than the whole model timed at once (%d us): "
                    "the budget counts %d us as the dense model, and per-layer savings may be overstated",
                    sum(dense_us.values()), model_us, sum(dense_us.values()))
    model_us = max(int(model_us), sum(dense_us.values()))
    return TwoFourCost("latency", dict(dense_us), dict(sparse_us), model_us, model_us - sum(dense_us.values()))


def _check_target(cost: TwoFourCost, target: float) -> None:
    if target > cost.reachable + 1e-12:
        raise ValueError(f"budget cannot be met: with every candidate 2:4 at most {cost.reachable:.6f} of the "
                         f"{cost.budget} can go, the target is {target}")


def allocate_two_four(curves: Mapping[str, Curve], cost: TwoFourCost, target: float,
                      current: Iterable[str] = ()) -> Allocation:
    """The candidates to make 2:4 with the least summed distortion, exactly; ``current`` stay 2:4.

    ``curves`` are the candidates' (dense, 2:4) curves; ties keep more layers dense, then earlier
    layers dense (the allocator's rules).
    """
    _check_target(cost, target)
    current = set(current)
    names = list(cost.dense)
    if sorted(curves) != sorted(names):
        raise ValueError("2:4 allocation needs exactly one curve per candidate")
    limit = cost.limit(target)
    levels, _ = allocate_levels({n: curves[n] for n in names}, cost.level_costs(), limit, first={n: 1 for n in current})
    chosen = [n for n in names if levels[n] == 1]
    distortion = predicted_distortion(curves, levels)
    return Allocation(chosen, cost(chosen), limit, distortion)


def removed_energy(module: nn.Linear) -> float:
    """The share of the layer's squared weight magnitude that its 2:4 mask removes (0 for a zero layer)."""
    w = module.weight.detach().double()
    total = float(w.pow(2).sum())
    return float((w * ~two_four_mask(w)).pow(2).sum()) / total if total > 0 else 0.0


def glob_two_four(layers: Mapping[str, nn.Linear], cost: TwoFourCost, target: float,
                  current: Iterable[str] = ()) -> Allocation:
    """Baseline: candidates ranked by the relative energy their 2:4 mask removes, least first, taken until the budget holds.

    ``current`` stay 2:4 (their mask removes nothing more). Cheap, and what a user tries first.
    """
    _check_target(cost, target)
    limit = cost.limit(target)
    chosen = set(current)
    energy = {n: removed_energy(m) for n, m in layers.items()}
    for name in sorted(layers, key=lambda n: energy[n]):  # sorted is stable: ties keep candidate order
        if cost(chosen) - cost.fixed <= limit:
            break
        chosen.add(name)
    if cost(chosen) - cost.fixed > limit:
        raise ValueError(f"budget cannot be met by glob: it allows {limit} but every candidate 2:4 costs {cost(chosen) - cost.fixed}")
    ordered = [n for n in layers if n in chosen]
    return Allocation(ordered, cost(ordered), limit, None)


def apply_two_four(layers: Mapping[str, nn.Linear], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Apply the 2:4 mask of each named layer in place; returns the masks (``{name: keep-mask}``)."""
    masks = {}
    with torch.no_grad():
        for name in names:
            weight = layers[name].weight
            masks[name] = two_four_mask(weight)
            weight.mul_(masks[name])
    return masks
