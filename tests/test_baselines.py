import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from rdprune.core.floor import max_amounts, min_kept
from rdprune.core.layers import describe_layers, prunable_layers
from rdprune.core.masks import apply_masks, layer_sparsity, pruned_count
from rdprune.granularity.weight.baselines import BASELINES, baseline_amounts, lamp_scores

from tiny_models import Branchy


def _model(seed=0):
    torch.manual_seed(seed)
    return Branchy()


def _executed(model):
    """Prunable layers in execution order, as the pipeline passes them."""
    layers = prunable_layers(model)
    return {i.name: layers[i.name] for i in describe_layers(model, (3, 8, 8))}


def _zeros(layers):
    return sum(int((m.weight == 0).sum()) for m in layers.values())


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("dense", [0, 50])
def test_one_shot_and_iterative_reach_target(method, dense):
    model = _model()
    layers = _executed(model)
    total = sum(m.weight.numel() for m in layers.values()) + dense
    previous = layer_sparsity(layers)
    for target in (0.2, 0.36, 0.488, 0.6 if method == "unifplus" else 0.85):
        amounts = baseline_amounts(method, layers, target, dense_weights=dense)
        expected = {n: pruned_count(a, layers[n].weight.numel()) for n, a in amounts.items()}
        apply_masks(model, amounts)
        # exactly the weights budget allocate uses: at most floor((1 - s) * total) kept, and no fewer
        assert total - _zeros(layers) == math.floor((1 - target) * total + 1e-9)
        now = layer_sparsity(layers)
        for n, m in layers.items():
            assert int((m.weight == 0).sum()) == expected[n]
            assert now[n] >= previous[n] - 1e-12  # no layer gets denser
        previous = now


def test_unif_is_uniform_and_unifplus_keeps_first_dense_and_last_20pct():
    layers = _executed(_model())
    a = baseline_amounts("unif", layers, 0.5)
    assert all(abs(v - 0.5) <= 1 / layers[n].weight.numel() for n, v in a.items())
    p = baseline_amounts("unifplus", layers, 0.65)
    assert p["stem"] == 0.0  # the first Conv2d to run (declared third)
    assert p["head"] == pytest.approx(0.8, abs=1 / 120)  # the last layer to run keeps >= 20 %
    assert p["right"] > 0.8
    # 896 weights, 268 may stay; the dense stem (216), 24 of the head and the others' floors (8 + 16 + 16) are 280
    with pytest.raises(ValueError, match=r"unifplus cannot reach target sparsity 0.7 under the weights budget: the prunable "
                       r"layers may keep at most 268 weights, but keep at least 280 with one weight per output unit in every "
                       r"layer \(its floor\), the first conv dense and 20 % of the last layer; allowed: a lower target sparsity$"):
        baseline_amounts("unifplus", layers, 0.7)


def test_glob_is_a_global_magnitude_threshold():
    model = _model()
    layers = prunable_layers(model)
    apply_masks(model, baseline_amounts("glob", layers, 0.6))
    kept = torch.cat([m.weight.detach().abs().flatten()[m.weight.flatten() != 0] for m in layers.values()])
    # every surviving weight is at least as large as any weight that was pruned (before pruning)
    model_ref = _model()
    ref = prunable_layers(model_ref)
    pruned_vals = torch.cat([ref[n].weight.detach().abs().flatten()[layers[n].weight.flatten() == 0] for n in layers])
    assert float(kept.min()) >= float(pruned_vals.max())


def test_lamp_scores_definition():
    w = torch.tensor([3.0, -1.0, 2.0, 0.0])
    # sorted by magnitude: 0, 1, 2, 3 -> 0/14, 1/14, 4/13, 9/9
    assert lamp_scores(w).tolist() == pytest.approx([1.0, 1 / 14, 4 / 13, 0.0])


def test_lamp_matches_brute_force_lowest_scores():
    model = _model(3)
    layers = prunable_layers(model)
    amounts = baseline_amounts("lamp", layers, 0.7)
    scores = torch.cat([lamp_scores(m.weight.detach().flatten()) for m in layers.values()])
    need = scores.numel() - math.floor(0.3 * scores.numel() + 1e-9)
    threshold = torch.sort(scores).values[need - 1]
    for n, m in layers.items():
        s = lamp_scores(m.weight.detach().flatten())
        assert pruned_count(amounts[n], s.numel()) == int((s <= threshold).sum())


def test_erk_densities_follow_the_rule():
    layers = prunable_layers(_model())
    amounts = baseline_amounts("erk", layers, 0.7)
    score = {n: sum(m.weight.shape) / np.prod(m.weight.shape) for n, m in layers.items()}
    free = {n: (1 - a) / score[n] for n, a in amounts.items() if 0 < 1 - amounts[n] < 1}
    # uncapped layers share one scale (up to rounding to whole weights)
    ratios = np.array(list(free.values()))
    assert len(ratios) >= 2 and ratios.max() / ratios.min() < 1.1
    capped = [n for n, a in amounts.items() if a == 0.0]
    assert all(score[n] >= max(score[m] for m in free) for n in capped)


def test_bad_input():
    layers = prunable_layers(_model())
    with pytest.raises(ValueError, match=r"unknown baseline 'rnd'; allowed: lamp, glob, unif, unifplus, erk"):
        baseline_amounts("rnd", layers, 0.5)
    with pytest.raises(ValueError, match=r"target sparsity must be a number in \[0, 1\), got 1.0"):
        baseline_amounts("glob", layers, 1.0)
    with pytest.raises(ValueError, match="glob cannot reach target sparsity 0.9 under the weights budget: "
                       "the skipped layers, kept dense, alone exceed it"):
        baseline_amounts("glob", layers, 0.9, dense_weights=10**6)
    with pytest.raises(ValueError, match=r"budget must be 'weights' or 'flops', got 'latency'"):
        baseline_amounts("glob", layers, 0.5, budget="latency")
    with pytest.raises(ValueError, match=r"a flops budget needs every prunable layer's dense FLOPs; missing for layers \['head'"):
        baseline_amounts("glob", layers, 0.5, budget="flops", flops={"stem": 10})
    with pytest.raises(ValueError, match=r"min_density must be a fraction in \[0, 1\)"):
        baseline_amounts("glob", layers, 0.5, min_density=1.0)


# --- FLOPs budget (issue 9, defect 1) -------------------------------------------------------------

def _flops(model):
    return {i.name: i.flops for i in describe_layers(model, (3, 8, 8))}


def _remaining_flops(layers, flops, dense_flops):
    return sum(flops[n] * int((m.weight != 0).sum()) / m.weight.numel() for n, m in layers.items()) + dense_flops


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("dense_flops", [0, 3000])
def test_flops_budget_is_met_never_exceeded_and_as_close_as_the_method_allows(method, dense_flops):
    model = _model()
    layers = _executed(model)
    flops = _flops(model)
    per_weight = {n: flops[n] / layers[n].weight.numel() for n in layers}
    assert len(set(per_weight.values())) >= 2  # a FLOPs budget differs from a weights budget here
    previous = layer_sparsity(layers)
    for target in (0.3, 0.5, 0.6 if method == "unifplus" else 0.8):
        amounts = baseline_amounts(method, layers, target, budget="flops", flops=flops, dense_flops=dense_flops)
        apply_masks(model, amounts)
        budget = (1 - target) * (sum(flops.values()) + dense_flops)
        remaining = _remaining_flops(layers, flops, dense_flops)
        assert remaining <= budget + 1e-9
        # short of the budget by less than one weight of each layer (its rounding)
        assert budget - remaining < sum(per_weight.values())
        now = layer_sparsity(layers)
        assert all(now[n] >= previous[n] - 1e-12 for n in layers)
        previous = now


@pytest.mark.parametrize("method,score", [("glob", lambda w: w.abs()), ("lamp", lamp_scores)])
def test_flops_budget_keeps_one_global_threshold_and_stops_at_the_budget(method, score):
    model = _model(1)
    layers = _executed(model)
    flops = _flops(model)
    scores = {n: score(m.weight.detach().flatten().double()) for n, m in layers.items()}
    amounts = baseline_amounts(method, layers, 0.6, budget="flops", flops=flops, dense_flops=500)
    weights = baseline_amounts(method, layers, 0.6)
    assert any(pruned_count(amounts[n], m.weight.numel()) != pruned_count(weights[n], m.weight.numel()) for n, m in layers.items())
    pruned, kept = [], []
    for n, m in layers.items():
        s = torch.sort(scores[n]).values
        c = pruned_count(amounts[n], m.weight.numel())
        pruned += [(float(v), n) for v in s[:c]]
        kept += [float(v) for v in s[c:]]
    assert max(v for v, _ in pruned) <= min(kept)  # one global threshold on the method's score
    apply_masks(model, amounts)
    budget = 0.4 * (sum(flops.values()) + 500)
    remaining = _remaining_flops(layers, flops, 500)
    assert remaining <= budget
    # giving back the last weight pruned (the highest score) would exceed the budget
    _, last = max(pruned)
    assert remaining + flops[last] / layers[last].weight.numel() > budget


def test_flops_budget_unif_is_uniform_and_erk_keeps_its_profile():
    model = _model(2)
    layers = _executed(model)
    flops = _flops(model)
    a = baseline_amounts("unif", layers, 0.55, budget="flops", flops=flops, dense_flops=2000)
    # dense FLOPs make the prunable layers carry more: the common fraction is above the target
    assert all(v > 0.55 for v in a.values())
    assert max(a.values()) - min(a.values()) <= 2 / min(m.weight.numel() for m in layers.values())
    e = baseline_amounts("erk", layers, 0.55, budget="flops", flops=flops, dense_flops=2000)
    score = {n: sum(m.weight.shape) / np.prod(m.weight.shape) for n, m in layers.items()}
    free = [(1 - v) / score[n] for n, v in e.items() if 0 < 1 - v < 1]
    assert len(free) >= 2 and max(free) / min(free) < 1.1


@pytest.mark.parametrize("base", [7, 10**15])  # the second overflows exact int64 costs: rounded up instead
def test_flops_budget_with_inexact_ratios_never_exceeds(base):
    model = _model(4)
    layers = _executed(model)
    flops = {n: base * m.weight.numel() + 3 for n, m in layers.items()}  # flops / size not an integer
    for method in BASELINES:
        amounts = baseline_amounts(method, layers, 0.4, budget="flops", flops=flops, dense_flops=11)
        kept = {n: m.weight.numel() - pruned_count(amounts[n], m.weight.numel()) for n, m in layers.items()}
        remaining = sum(Fraction(flops[n] * kept[n], layers[n].weight.numel()) for n in layers) + 11
        budget = Fraction(0.6 * (sum(flops.values()) + 11))
        assert remaining <= budget, method
        assert budget - remaining < sum(Fraction(flops[n], m.weight.numel()) for n, m in layers.items()), method


# --- Per-layer floor (issue 9, defect 4) ----------------------------------------------------------

def test_default_floor_is_one_weight_per_output_unit():
    layers = _executed(_model())
    floors = max_amounts(layers)
    assert floors == {"head": 115 / 120, "stem": 208 / 216, "right": 280 / 288, "left": 112 / 128, "depthwise": 128 / 144}
    assert {n: min_kept(m) for n, m in layers.items()} == {n: m.weight.shape[0] for n, m in layers.items()}
    assert min_kept(layers["head"], 0.1) == 12 and max_amounts(layers, 0.1)["left"] == 112 / 128


class _Weak(torch.nn.Module):
    """A middle layer with tiny weights: a global threshold would take it whole without a floor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(20, 30)
        self.b = torch.nn.Linear(30, 30)
        self.c = torch.nn.Linear(30, 4)
        with torch.no_grad():
            self.b.weight.mul_(1e-3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("budget", ["weights", "flops"])
def test_no_layer_is_pruned_past_its_floor(method, budget):
    for model, shape in ((_model(), (3, 8, 8)), (_Weak(), (20,))):
        layers = {i.name: prunable_layers(model)[i.name] for i in describe_layers(model, shape)}
        flops = {i.name: i.flops for i in describe_layers(model, shape)}
        total = sum(m.weight.numel() for m in layers.values())
        floor = sum(m.weight.shape[0] for m in layers.values())
        if method == "unifplus":  # its first conv stays dense and its last layer keeps 20 %
            floor = 216 + 24 + 32 if isinstance(model, Branchy) else 24 + 60
        target = 1 - 1.1 * floor / total
        kwargs = {"budget": budget, "flops": flops} if budget == "flops" else {}
        amounts = baseline_amounts(method, layers, target, **kwargs)
        for n, m in layers.items():
            assert m.weight.numel() - pruned_count(amounts[n], m.weight.numel()) >= m.weight.shape[0], (n, amounts[n])
        # a raised floor holds too, and the total is still exact
        dense = baseline_amounts(method, layers, 0.5, min_density=0.3)
        kept = {n: m.weight.numel() - pruned_count(dense[n], m.weight.numel()) for n, m in layers.items()}
        assert all(kept[n] >= math.ceil(0.3 * m.weight.numel()) for n, m in layers.items())
        assert sum(kept.values()) == math.floor(0.5 * total + 1e-9)


def test_glob_fills_the_other_layers_when_one_hits_its_floor():
    model = _Weak()
    layers = prunable_layers(model)
    amounts = baseline_amounts("glob", layers, 0.8)
    assert amounts["b"] == 1 - 30 / 900  # b would go whole; it keeps one weight per output unit
    apply_masks(model, amounts)
    assert sum(int((m.weight != 0).sum()) for m in layers.values()) == math.floor(0.2 * (600 + 900 + 120) + 1e-9)
    # among the layers above their floor the threshold is still global
    kept = min(float(m.weight.detach().abs()[m.weight != 0].min()) for n, m in layers.items() if n != "b")
    ref = _Weak()
    pruned = max(float(getattr(ref, n).weight.detach().abs()[getattr(model, n).weight == 0].max()) for n in ("a", "c"))
    assert pruned <= kept


@pytest.mark.parametrize("method", BASELINES)
def test_a_target_the_floors_make_unreachable_is_a_clear_error(method):
    layers = _executed(_model())
    with pytest.raises(ValueError, match=rf"{method} cannot reach target sparsity 0.97 under the weights budget: the prunable layers may "
                       r"keep at most 26 weights, but keep at least \d+ with one weight per output unit in every layer.*; "
                       "allowed: a lower target sparsity"):
        baseline_amounts(method, layers, 0.97)
    with pytest.raises(ValueError, match=r"FLOPs, but keep at least \d+ with one weight per output unit in every layer \(its floor\) "
                       r"and min_density=0.5 of its weights.*; allowed: a lower target sparsity or a lower min_density"):
        baseline_amounts(method, layers, 0.6, budget="flops", flops=_flops(_model()), min_density=0.5)


@pytest.mark.parametrize("method", BASELINES)
def test_a_layer_already_past_its_floor_is_left_as_it_is(method):
    model = _model()
    layers = _executed(model)
    apply_masks(model, {"right": 1.0, "left": 0.95})  # pruned before the floor existed
    # 49 of 896 weights stay: right keeps 0 and left 6, the other three 43 (their floors: 5 + 8 + 16)
    amounts = baseline_amounts(method, layers, 0.7 if method == "unifplus" else 0.945)
    assert amounts["right"] == 1.0 and amounts["left"] == pytest.approx(0.95, abs=1 / 128)
    for n in ("head", "depthwise", "stem"):
        assert pruned_count(amounts[n], layers[n].weight.numel()) <= layers[n].weight.numel() - layers[n].weight.shape[0]


def test_max_sparsity_is_the_edge_of_what_the_floors_allow():
    from rdprune.core.floor import max_sparsity

    model = _model()
    layers = _executed(model)
    flops = _flops(model)
    assert max_sparsity(layers) == 1 - 53 / 896
    edge = max_sparsity(layers, 0.0, 50)
    assert edge == 1 - 103 / 946
    amounts = baseline_amounts("glob", layers, edge, dense_weights=50)
    assert all(m.weight.numel() - pruned_count(amounts[n], m.weight.numel()) == m.weight.shape[0] for n, m in layers.items())
    with pytest.raises(ValueError, match="cannot reach"):
        baseline_amounts("glob", layers, edge + 0.002, dense_weights=50)
    f_edge = max_sparsity(layers, 0.2, flops=flops, dense_flops=100)
    baseline_amounts("unif", layers, f_edge - 1e-9, budget="flops", flops=flops, dense_flops=100, min_density=0.2)
    with pytest.raises(ValueError, match="cannot reach"):
        baseline_amounts("unif", layers, f_edge + 1e-3, budget="flops", flops=flops, dense_flops=100, min_density=0.2)


@pytest.mark.parametrize("budget", ["weights", "flops"])
def test_global_threshold_with_many_ties_is_exact_and_breaks_ties_by_layer_order(budget):
    model = _model(5)
    layers = _executed(model)
    flops = _flops(model)
    with torch.no_grad():
        for m in layers.values():
            m.weight.copy_(torch.round(m.weight * 10) / 10)  # few distinct magnitudes
    kwargs = {"budget": "flops", "flops": flops} if budget == "flops" else {}
    amounts = baseline_amounts("glob", layers, 0.55, **kwargs)
    pruned = {n: pruned_count(amounts[n], m.weight.numel()) for n, m in layers.items()}
    ranked = {n: torch.sort(m.weight.detach().abs().flatten()).values for n, m in layers.items()}
    threshold = max(float(ranked[n][pruned[n] - 1]) for n in layers if pruned[n])
    names = list(layers)
    for i, n in enumerate(names):
        below = int((ranked[n] < threshold).sum())
        at = int((ranked[n] <= threshold).sum())
        assert below <= pruned[n] <= at
        if pruned[n] < at:  # a layer that left ties unpruned: every later layer prunes none of its ties
            assert all(pruned[m] == int((ranked[m] < threshold).sum()) for m in names[i + 1:])
    kept = {n: m.weight.numel() - pruned[n] for n, m in layers.items()}
    if budget == "weights":
        assert sum(kept.values()) == math.floor(0.45 * 896 + 1e-9)
    else:
        per = {n: flops[n] // layers[n].weight.numel() for n in layers}
        remaining, limit = sum(per[n] * kept[n] for n in layers), 0.45 * sum(flops.values())
        assert remaining <= limit
        last = next(n for n in reversed(names) if pruned[n] > int((ranked[n] < threshold).sum()))
        assert remaining + per[last] > limit  # one weight fewer pruned would not fit
