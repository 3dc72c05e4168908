"""Allocation: exact against brute force and the plain DP; budget, iterative, running-max and tie rules."""
import itertools
import math

import numpy as np
import pytest

from rdprune.bench.allocate import resnet32_sizes, synthetic_curves
from rdprune.core.allocation import allocate, exact_dp_allocate
from rdprune.core.grid import Curve
from rdprune.core.masks import pruned_count


def _score(curves, sizes, amounts, flops=None):
    """Objective (running-max distortion), surviving weights and exact remaining FLOPs of a solution."""
    d, kept, fl = 0.0, 0, 0
    for name, a in amounts.items():
        c = curves[name]
        k = int(np.searchsorted(c.amounts, a))
        assert c.amounts[k] == a
        d += float(np.maximum.accumulate(c.distortion)[k])
        surv = sizes[name] - pruned_count(a, sizes[name])
        kept += surv
        if flops:
            fl += surv * flops[name] / sizes[name]
    return d, kept, fl


def _brute(curves, sizes, s, budget, flops, current):
    """Best (objective, -kept cost) over all level combinations allowed by the rules."""
    names = list(curves)
    options = []
    for n in names:
        zeros = pruned_count(current.get(n, 0.0), sizes[n]) if current else 0
        options.append([a for a in curves[n].amounts if pruned_count(float(a), sizes[n]) >= zeros])
    if budget == "weights":
        limit = math.floor((1 - s) * sum(sizes.values()) + 1e-9)
    else:
        limit = (1 - s) * sum(flops.values())
    best = None
    for combo in itertools.product(*options):
        amounts = dict(zip(names, map(float, combo)))
        d, kept, fl = _score(curves, sizes, amounts, flops)
        used = kept if budget == "weights" else fl
        if used > limit * (1 + 1e-12):
            continue
        if best is None or d < best[0] - 1e-12 * abs(d) or (abs(d - best[0]) <= 1e-12 * abs(d) and used > best[1]):
            best = (d, used)
    return best, limit


def test_matches_brute_force_on_random_small_instances():
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(400):
        L, K = int(rng.integers(2, 6)), int(rng.integers(3, 7))
        curves, sizes, flops, current = {}, {}, {}, {}
        for i in range(L):
            a = np.sort(rng.choice(np.linspace(0, 1, 21), K, replace=False))
            d = np.cumsum(rng.random(K)) if rng.random() < 0.5 else rng.random(K)  # monotone or dipping
            name = f"l{i}"
            curves[name], sizes[name] = Curve(a, d), int(rng.integers(1, 80))
            flops[name] = sizes[name] * int(rng.integers(1, 9)) if rng.random() < 0.7 else int(rng.integers(1, 999))
            if rng.random() < 0.3:
                current[name] = float(a[rng.integers(0, K)] * rng.random())
        s = float(rng.uniform(0, 0.95))
        budget = "flops" if rng.random() < 0.5 else "weights"
        kwargs = {"budget": budget, "flops": flops, "current": current or None}
        best, limit = _brute(curves, sizes, s, budget, flops, current)
        if best is None:
            with pytest.raises(ValueError, match="budget cannot be met"):
                allocate(curves, sizes, s, **kwargs)
            continue
        got = allocate(curves, sizes, s, **kwargs)
        d, kept, fl = _score(curves, sizes, got, flops)
        used = kept if budget == "weights" else fl
        assert used <= limit * (1 + 1e-12)
        assert d == pytest.approx(best[0], rel=1e-12, abs=1e-15)
        assert used == pytest.approx(best[1], rel=1e-12)  # the tie rule: most kept among equals
        checked += 1
    assert checked > 200


def test_ties_keep_the_most_weights_then_earlier_layers_less_pruned():
    a = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    flat = Curve(a, np.array([0.0, 1.0, 1.0, 1.0, 2.0]))  # pruning 25-75 % costs the same
    # One layer, at most 70 of 100 weights kept: 50 % and 75 % tie; 50 % keeps more weights.
    assert allocate({"x": flat}, {"x": 100}, 0.3) == {"x": 0.5}
    assert exact_dp_allocate({"x": flat}, {"x": 100}, 0.3) == {"x": 0.5}
    # Two layers, at most 100 of 200 kept: (0 %, 100 %) and (25 %, 75 %) both cost 2 and keep 100;
    # the lexicographic rule picks the first layer less pruned.
    assert allocate({"x": flat, "y": flat}, {"x": 100, "y": 100}, 0.5) == {"x": 0.0, "y": 1.0}
    assert allocate({"y": flat, "x": flat}, {"x": 100, "y": 100}, 0.5) == {"y": 0.0, "x": 1.0}


def test_matches_plain_dp_at_resnet32_scale():
    sizes = resnet32_sizes()
    assert len(sizes) == 32 and sum(sizes.values()) == 461872
    for seed in range(3):
        curves = synthetic_curves(sizes, 11, np.random.default_rng(seed))
        for s in (0.5, 0.9):
            fast, plain = allocate(curves, sizes, s), exact_dp_allocate(curves, sizes, s)
            d_fast, kept_fast, _ = _score(curves, sizes, fast)
            d_plain, kept_plain, _ = _score(curves, sizes, plain)
            assert d_fast == pytest.approx(d_plain, rel=1e-12)
            assert kept_fast == kept_plain <= math.floor((1 - s) * sum(sizes.values()) + 1e-9)


def test_no_layer_gets_denser():
    sizes = resnet32_sizes()
    rng = np.random.default_rng(5)
    curves = synthetic_curves(sizes, 11, rng)
    # Early layers are already sparse, but their curves say pruning them is expensive.
    current = {n: 0.63 for n in list(sizes)[:8]}
    curves.update({n: Curve(curves[n].amounts, curves[n].distortion * 1e3) for n in current})
    got = allocate(curves, sizes, 0.5, current=current)
    for n, c in current.items():
        assert pruned_count(got[n], sizes[n]) >= pruned_count(c, sizes[n])
    d, kept, _ = _score(curves, sizes, got)
    plain = exact_dp_allocate(curves, sizes, 0.5, current=current)
    assert d == pytest.approx(_score(curves, sizes, plain)[0], rel=1e-12)


def test_dipping_curve_does_not_prune_beyond_the_target():
    a = np.linspace(0, 1, 11)
    sizes = {"smooth": 1000, "dips": 1000}
    curves = {
        "smooth": Curve(a, a**2),
        "dips": Curve(a, np.array([0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.05, 0.02, 0.01, 0.4])),
    }
    got = allocate(curves, sizes, 0.5)
    total = sum(pruned_count(got[n], sizes[n]) for n in sizes) / 2000
    assert total == pytest.approx(0.5)  # the raw curve's dip at 70-90 % would have lured it further


def test_flops_budget_with_inexact_ratios_stays_within_budget():
    rng = np.random.default_rng(7)
    a = np.linspace(0, 1, 6)
    sizes = {f"l{i}": int(p) for i, p in enumerate((97, 89, 83, 79, 73, 71, 67))}
    flops = {n: int(rng.integers(10**9, 10**10)) for n in sizes}  # huge common denominator: rounded-up costs
    curves = {n: Curve(a, np.cumsum(rng.random(6))) for n in sizes}
    got = allocate(curves, sizes, 0.6, budget="flops", flops=flops)
    _, _, fl = _score(curves, sizes, got, flops)
    assert fl <= 0.4 * sum(flops.values())
    exact, _ = _brute(curves, sizes, 0.6, "flops", flops, {})
    assert _score(curves, sizes, got, flops)[0] == pytest.approx(exact[0], rel=1e-12)


def _small():
    a = np.linspace(0, 1, 5)
    return {"x": Curve(a, a), "y": Curve(a, a**2)}, {"x": 10, "y": 20}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"target_sparsity": 1.0}, r"target_sparsity must be a number in \[0, 1\)"),
        ({"target_sparsity": -0.1}, r"target_sparsity must be a number in \[0, 1\)"),
        ({"sizes": {"x": 10}}, r"sizes missing for layers \['y'\]"),
        ({"sizes": {"x": 10, "y": 0}}, r"sizes of layers \['y'\] must be positive ints"),
        ({"budget": "params"}, r"budget must be 'weights' or 'flops'"),
        ({"budget": "flops"}, r"flops missing for layers \['x', 'y'\]"),
        ({"current": {"x": 1.5}}, r"current sparsity of layer 'x' must be a fraction in \[0, 1\]"),
        ({"dense_weights": -1}, r"dense_weights must be a non-negative int"),
        ({"dense_weights": 10**6, "target_sparsity": 0.5}, r"budget cannot be met"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_problem(change, message):
    curves, sizes = _small()
    kwargs = {"curves": curves, "sizes": sizes, "target_sparsity": 0.5}
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        allocate(**kwargs)


def test_bad_curves_and_unreachable_current():
    curves, sizes = _small()
    broken = Curve(np.linspace(0, 1, 5), np.zeros(5))
    broken.distortion[2] = np.nan  # arrays stay writable after validation
    with pytest.raises(ValueError, match=r"curves of layers \['x'\] contain NaN or inf"):
        allocate({"x": broken, "y": curves["y"]}, sizes, 0.5)
    short = {"x": Curve(np.array([0.0, 0.5]), np.zeros(2)), "y": curves["y"]}
    with pytest.raises(ValueError, match=r"layers \['x'\] have no curve level at or above their current sparsity"):
        allocate(short, sizes, 0.5, current={"x": 0.8})
    with pytest.raises(ValueError, match="budget cannot be met"):
        allocate(short, sizes, 0.9)
    with pytest.raises(ValueError, match="no curves given"):
        allocate({}, sizes, 0.5)
