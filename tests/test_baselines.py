import numpy as np
import pytest
import torch

from rdprune.core.baselines import BASELINES, baseline_amounts, lamp_scores
from rdprune.core.layers import describe_layers, prunable_layers
from rdprune.core.masks import apply_masks, layer_sparsity, pruned_count
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
    for target in (0.2, 0.36, 0.488, 0.65 if method == "unifplus" else 0.9):
        amounts = baseline_amounts(method, layers, target, dense_weights=dense)
        expected = {n: pruned_count(a, layers[n].weight.numel()) for n, a in amounts.items()}
        apply_masks(model, amounts)
        # exact total up to one weight per layer
        assert abs(_zeros(layers) - round(target * total)) <= len(layers)
        now = layer_sparsity(layers)
        for n, m in layers.items():
            assert int((m.weight == 0).sum()) == expected[n]
            assert now[n] >= previous[n] - 1e-12  # no layer gets denser
        previous = now


def test_unif_is_uniform_and_unifplus_keeps_first_dense_and_last_20pct():
    layers = _executed(_model())
    a = baseline_amounts("unif", layers, 0.5)
    assert all(abs(v - 0.5) <= 1 / layers[n].weight.numel() for n, v in a.items())
    p = baseline_amounts("unifplus", layers, 0.7)
    assert p["stem"] == 0.0  # the first Conv2d to run (declared third)
    assert p["head"] == pytest.approx(0.8, abs=1 / 120)  # the last layer to run keeps >= 20 %
    assert p["right"] > 0.8
    with pytest.raises(ValueError, match="cannot prune 806 weights: the layers allow at most 656 under this method"):
        baseline_amounts("unifplus", layers, 0.9)


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
    need = round(0.7 * scores.numel())
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
    with pytest.raises(ValueError, match="needs .* zeros but the prunable layers hold only"):
        baseline_amounts("glob", layers, 0.9, dense_weights=10**6)
