"""Allocation: exact against brute force and the plain DP; budget, iterative, running-max and tie rules."""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from rdprune.bench.allocate import PLATEAU_KINDS, plateau_curves, resnet32_sizes, resnet50_layers, synthetic_curves
from rdprune.core import allocation
from rdprune.core.allocation import allocate, allocate_with_stats, exact_dp_allocate
from rdprune.core.grid import Curve
from rdprune.core.masks import pruned_count


def _score(curves, sizes, amounts, flops=None):
    """Objective (running-max distortion), surviving weights and exact remaining FLOPs of a solution."""
    d, kept, fl = 0.0, 0, Fraction(0)
    for name, a in amounts.items():
        c = curves[name]
        k = int(np.searchsorted(c.amounts, a))
        assert c.amounts[k] == a
        d += float(np.maximum.accumulate(c.distortion)[k])
        surv = sizes[name] - pruned_count(a, sizes[name])
        kept += surv
        if flops:
            fl += Fraction(surv * flops[name], sizes[name])
    return d, kept, fl


def _brute(curves, sizes, s, budget, flops, current):
    """The documented answer by enumeration: least objective, then most kept cost, then smallest levels.

    Returns ``((objective, kept cost, amounts), limit)``, or ``(None, limit)`` when nothing fits;
    costs and limit are exact (Fractions). Objectives within 1e-12 count as tied.
    """
    names = list(curves)
    # Exact costs as ints: weights, or FLOPs times the common denominator q of all flops/size.
    q = 1 if budget == "weights" else math.lcm(*sizes.values())
    options = []  # per layer: (amount, running-max distortion, kept cost) of the allowed levels
    for n in names:
        zeros = pruned_count(current.get(n, 0.0), sizes[n]) if current else 0
        dist = np.maximum.accumulate(curves[n].distortion)
        layer = []
        for a, d in zip(curves[n].amounts.tolist(), dist.tolist()):
            surv = sizes[n] - pruned_count(a, sizes[n])
            if sizes[n] - surv >= zeros:
                layer.append((a, d, surv if budget == "weights" else surv * flops[n] * (q // sizes[n])))
        options.append(layer)
    if budget == "weights":
        limit = math.floor((1 - s) * sum(sizes.values()) + 1e-9)
    else:
        limit = math.floor(Fraction((1 - s) * sum(flops.values())) * q)
    best = None
    for combo in itertools.product(*options):  # lexicographic order: the first of equals wins
        used = sum(c for _, _, c in combo)
        if used > limit:
            continue
        d = 0.0
        for _, value, _ in combo:
            d += value
        if best is None or d < best[0] - 1e-12 * abs(d) or (abs(d - best[0]) <= 1e-12 * abs(d) and used > best[1]):
            best = (d, used, combo)
    if best is None:
        return None, Fraction(limit, q)
    return (best[0], Fraction(best[1], q), {n: a for n, (a, _, _) in zip(names, best[2])}), Fraction(limit, q)


def _check_against_brute_force(curves, sizes, s, budget, flops, current):
    """Assert that allocate gives exactly the brute-force answer (or the same error); its stats, or None."""
    kwargs = {"budget": budget, "flops": flops, "current": current or None}
    best, limit = _brute(curves, sizes, s, budget, flops, current)
    if best is None:
        with pytest.raises(ValueError, match="budget cannot be met"):
            allocate(curves, sizes, s, **kwargs)
        return None
    got, stats = allocate_with_stats(curves, sizes, s, **kwargs)
    d, kept, fl = _score(curves, sizes, got, flops)
    used = kept if budget == "weights" else fl
    assert used <= limit
    assert d == pytest.approx(best[0], rel=1e-12, abs=1e-15)
    assert used == best[1]  # the tie rule: most kept among equals
    assert got == best[2]  # then the lexicographically smallest levels
    return stats


def _small_instance(rng, curve):
    """Random layers (2-5) with 3-6 levels from a 0.05 grid, sizes, FLOPs, current sparsities; curves by ``curve(a)``."""
    L, K = int(rng.integers(2, 6)), int(rng.integers(3, 7))
    curves, sizes, flops, current = {}, {}, {}, {}
    for i in range(L):
        a = np.sort(rng.choice(np.linspace(0, 1, 21), K, replace=False))
        name = f"l{i}"
        curves[name], sizes[name] = Curve(a, curve(a)), int(rng.integers(1, 80))
        flops[name] = sizes[name] * int(rng.integers(1, 9)) if rng.random() < 0.7 else int(rng.integers(1, 999))
        if rng.random() < 0.3:
            current[name] = float(a[rng.integers(0, K)] * rng.random())
    budget = "flops" if rng.random() < 0.5 else "weights"
    return curves, sizes, flops, current, float(rng.uniform(0, 0.95)), budget


@pytest.fixture(params=["pareto always", "pareto from default"])
def pareto_from(request, monkeypatch):
    """Run twice: with Pareto filtering at every step (small instances never reach the default threshold) and as shipped."""
    if request.param == "pareto always":
        monkeypatch.setattr(allocation, "_PARETO_FROM", 0)


def test_matches_brute_force_on_random_small_instances(pareto_from):
    rng = np.random.default_rng(1)

    def curve(a):
        return np.cumsum(rng.random(a.size)) if rng.random() < 0.5 else rng.random(a.size)  # monotone or dipping

    checked = 0
    for _ in range(400):
        curves, sizes, flops, current, s, budget = _small_instance(rng, curve)
        checked += _check_against_brute_force(curves, sizes, s, budget, flops, current) is not None
    assert checked > 200


def test_matches_brute_force_on_plateaus_and_zero_runs(pareto_from):
    """Staircases, zero runs, all-zero and flat curves: ties everywhere, many of them across layers.

    Distortions are multiples of 1/4 so that equal sums are exactly equal in float and the tie
    rule decides; the instances also cover optima inside every layer's zero run, where the tie
    rule alone picks the levels, and several optimal plateau choices.
    """
    rng = np.random.default_rng(2)

    def curve(a):
        shape = rng.integers(0, 5)
        if shape == 0:  # staircase
            return np.cumsum(rng.choice([0.0, 0.0, 0.25, 0.5, 1.0], a.size))
        if shape == 1:  # zero run, then rising
            z = int(rng.integers(1, a.size + 1))
            return np.concatenate([np.zeros(z), np.cumsum(rng.integers(1, 4, a.size - z)) / 4])
        if shape == 2:  # dead layer: pruning it never matters
            return np.zeros(a.size)
        if shape == 3:  # dipping, plateaus only after the running max
            return rng.integers(0, 4, a.size) / 4
        return np.full(a.size, 0.5)

    checked, filled, several = 0, 0, 0
    for _ in range(800):
        curves, sizes, flops, current, s, budget = _small_instance(rng, curve)
        stats = _check_against_brute_force(curves, sizes, s, budget, flops, current)
        if stats is not None:
            checked += 1
            filled += stats.tie_intervals > 0
            several += stats.signatures > 1
    assert checked > 400 and filled > 200 and several > 5  # the tie paths were exercised
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


def test_optimum_inside_zero_runs_fills_the_budget_then_keeps_earlier_layers():
    """Zero distortion up to 60 % in every layer and a target inside: only the tie rule decides."""
    a = np.linspace(0, 1, 11)
    zero_run = Curve(a, np.where(a <= 0.6 + 1e-9, 0.0, a))
    sizes = {"a": 10, "b": 10, "c": 3}  # kept weights within the runs: 10..4, 10..4 and 3, 2, 1
    curves = dict.fromkeys(sizes, zero_run)
    # At most 13 of 23 weights: a = 10 or 9 leaves b + c <= 4 < 4 + 1, so a = 8, b = 4, c = 1 (13 kept).
    assert allocate(curves, sizes, 0.4) == {"a": a[2], "b": a[6], "c": a[5]}
    plain = exact_dp_allocate(curves, sizes, 0.4)
    assert _score(curves, sizes, plain)[:2] == (0.0, 13)


def test_plateau_choices_tied_in_distortion_and_cost_are_all_filled(pareto_from):
    """Two optimal plateau choices with equal distortion (3) and equal bottom cost (90 kept); only
    the second, lexicographically later one can move up its plateau to use the budget (95)."""
    sizes = {"a": 100, "b": 100}
    curves = {
        "a": Curve(np.array([0.0, 0.5, 0.6]), np.array([0.0, 1.0, 2.0])),  # kept 100, 50, 40
        "b": Curve(np.array([0.0, 0.3, 0.4, 0.45, 0.5, 0.6]), np.array([0.0, 1.0, 1.0, 1.0, 1.0, 2.0])),  # kept 100, 70, 60, 55, 50, 40
    }
    # a at 0.5 with b at 0.6, or a at 0.6 with b anywhere on its 0.3-0.5 plateau; b at 0.45 fits 95.
    got, stats = allocate_with_stats(curves, sizes, 0.525)
    assert got == {"a": 0.6, "b": 0.45} and stats.signatures == 2
    assert _brute(curves, sizes, 0.525, "weights", None, None)[0][2] == got


@pytest.mark.parametrize("kind", PLATEAU_KINDS)
def test_plateau_curves_match_plain_dp_at_resnet32_scale(kind):
    sizes = resnet32_sizes()
    curves = plateau_curves(sizes, 21, np.random.default_rng(3), kind)
    for s in (0.7, 0.9):
        fast, plain = allocate(curves, sizes, s), exact_dp_allocate(curves, sizes, s)
        d_fast, kept_fast, _ = _score(curves, sizes, fast)
        d_plain, kept_plain, _ = _score(curves, sizes, plain)
        assert d_fast == pytest.approx(d_plain, rel=1e-12)
        assert kept_fast == kept_plain <= math.floor((1 - s) * sum(sizes.values()) + 1e-9)


def test_plateau_search_states_stay_bounded_at_resnet50_scale():
    """ResNet-50 sizes, 101 levels, plateaus in every layer: the work is bounded in states, not seconds.

    Before plateaus were collapsed, such curves kept over 10^6 partial states (over 20 s, GBs):
    equal distortion at many costs was kept state by state. Now the search over plateau choices
    sees distortion strictly rising along each layer, and the budget fill along the plateaus works
    within the budget left at the bottoms, which is below the cost of any distortion-lowering move.
    The bounds are about twice the largest counts of these instances.
    """
    sizes, flops = resnet50_layers()
    names = list(sizes)
    worst = {"states": 0, "peak": 0, "tie_intervals": 0}
    for seed in (0, 2):
        rng = np.random.default_rng(seed)
        for kind in PLATEAU_KINDS:
            curves = plateau_curves(sizes, 101, rng, kind)
            current = {n: float(rng.uniform(0.0, 0.4)) for n in names[::3]}
            for budget, target, now in itertools.product(("weights", "flops"), (0.5, 0.7, 0.9), (None, current)):
                got, stats = allocate_with_stats(curves, sizes, target, budget=budget, flops=flops, current=now)
                _, kept, fl = _score(curves, sizes, got, flops)
                assert (kept <= (1 - target) * sum(sizes.values())) if budget == "weights" else (fl <= (1 - target) * sum(flops.values()))
                for key in worst:
                    worst[key] = max(worst[key], getattr(stats, key))
    assert worst["states"] <= 100_000 and worst["peak"] <= 100_000 and worst["tie_intervals"] <= 100_000, worst


def test_plain_dp_takes_only_what_it_uses():
    """The reference DP counts surviving weights; it has no FLOPs arguments to silently ignore."""
    curves, sizes = _small()
    for unusable in ({"budget": "flops"}, {"flops": {"x": 10, "y": 20}}, {"dense_flops": 5}):
        with pytest.raises(TypeError):
            exact_dp_allocate(curves, sizes, 0.5, **unusable)
    assert exact_dp_allocate(curves, sizes, 0.5, current={"x": 0.5}, dense_weights=0) == allocate(curves, sizes, 0.5, current={"x": 0.5})


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


@pytest.mark.parametrize("budget", ["weights", "flops"])
def test_zero_runs_covering_the_target_stay_bounded(budget):
    """Every layer can meet the target without leaving its zero run: every choice within the budget
    is optimal, and keeping the most weights among them is a subset-sum. Before the cap this ran
    for seconds (weights) or out of memory (FLOPs); now the fill turns greedy past its interval cap."""
    sizes, flops = resnet50_layers()
    rng = np.random.default_rng(0)
    amounts = np.linspace(0.0, 1.0, 101)
    curves = {}
    for name in sizes:
        edge = rng.uniform(0.6, 0.95)
        curves[name] = Curve(amounts, np.where(amounts <= edge, 0.0, (amounts - edge) * rng.uniform(1, 5)))
    got, stats = allocate_with_stats(curves, sizes, 0.5, budget=budget, flops=flops)
    distortion, kept, fl = _score(curves, sizes, got, flops)
    assert distortion == 0.0
    limit = (1 - 0.5) * (sum(flops.values()) if budget == "flops" else sum(sizes.values()))
    used = fl if budget == "flops" else kept
    assert used <= limit and used >= 0.99 * limit  # within the budget, and not pruning far past it
    assert stats.greedy_fill and stats.peak <= 100_000
    assert stats.tie_intervals <= allocation._FILL_TOTAL_LIMIT + allocation._FILL_STEP_LIMIT


def test_one_allocation_type_for_every_granularity_and_the_old_names_warn():
    from rdprune.core.allocation import Allocation
    from rdprune.granularity.two_four.units import layer_cost

    result = Allocation({"g": 2}, cost=5.0, limit=6.0, distortion=1.0, lower_bound=0.5)
    assert result.gap == 0.5
    with pytest.warns(DeprecationWarning, match="Allocation.removal is deprecated; use Allocation.choice"):
        assert result.removal == {"g": 2}
    with pytest.warns(DeprecationWarning, match="Allocation.layers is deprecated"):
        assert result.layers == {"g": 2}
    cost = layer_cost(["a", "b", "c", "d"])  # the cost protocol: budget, total, the cost of a choice
    assert (cost.budget, cost.total, cost(["a"])) == ("layers", 4, 3)
