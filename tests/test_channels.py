"""Channel granularity core: groups, masks equal to removal, curves against their definition, costs, allocation."""
import itertools
import logging
import sys

import numpy as np
import pytest
import torch
from torch import nn

from rdprune.core.allocation import allocate_levels
from rdprune.core.grid import Curve
from rdprune.core.layers import layer_flops
from rdprune.core.masks import enforce_masks
from rdprune.errors import UserError
from rdprune.granularity.channel.allocation import allocate_channels, meet_measured_latency
from rdprune.granularity.channel.baselines import channel_baseline
from rdprune.granularity.channel.costs import ChannelCost
from rdprune.granularity.channel.curves import estimate_channel_curves, group_plan, plain_channel_curves
from rdprune.granularity.channel.export import remove_channels
from rdprune.granularity.channel.latency import LatencyTable, LayerGrid
from rdprune.granularity.channel.space import ChannelSpace
from rdprune.models.cifar_resnet import resnet20

from tiny_models import DepthwiseConcat, lived_in

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def resnet():
    return lived_in(resnet20(10, in_channels=1, shortcut="projection"))


def test_resnet20_groups_tie_the_residual_stream_and_keep_the_outputs(resnet):
    space = ChannelSpace(resnet, torch.zeros(1, 1, 28, 28))
    assert len(space.groups) == 12  # 9 block-internal groups and 3 residual streams
    stream = {(s.layer, s.dim) for s in space.groups["layer3.0.conv2"].slices}
    assert {("layer3.0.shortcut.0", 0), ("layer3.1.conv2", 0), ("layer3.2.conv2", 0), ("layer3.1.conv1", 1), ("fc", 1)} <= stream
    assert {(s.layer, s.dim) for s in space.groups["layer1.0.conv1"].slices} == {("layer1.0.conv1", 0), ("layer1.0.conv2", 1)}
    assert "fc" not in space.groups and all(g.min_kept == 1 for g in space.groups.values())


@pytest.mark.parametrize("build,shape", [(lambda: lived_in(resnet20(10, 1, "projection")), (1, 28, 28)),
                                         (lambda: lived_in(DepthwiseConcat()), (3, 8, 8))])
def test_masked_channels_compute_what_the_physically_smaller_model_computes(build, shape):
    model = build()
    x = torch.randn(8, *shape)
    space = ChannelSpace(model, x[:1])
    rng = np.random.default_rng(0)
    removal = {g: int(rng.integers(1, space.max_removed(g) + 1)) for g in space.groups}
    smaller = remove_channels(model, x[:1], space.removed_indices(removal))
    with torch.no_grad():
        enforce_masks(space.layers, space.masks(removal))
        masked, physical = model(x), smaller(x)
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(physical, masked, rtol=1e-5, atol=1e-5 * float(masked.abs().max()))
    assert all(space.removed(g) == n for g, n in removal.items())  # removed channels read back from the weights


def test_depthwise_layers_keep_as_many_inputs_as_outputs():
    model = lived_in(DepthwiseConcat())
    space = ChannelSpace(model, torch.zeros(1, 3, 8, 8))
    kept = space.kept_channels({"a": 3, "b": 2})
    assert kept["dw"] == (5, 5) and kept["mix"] == (14 - 5, 10) and kept["a"] == (3, 5) and kept["head"] == (160, 5)


def test_a_zero_padding_shortcut_is_refused_with_the_layer_named():
    with pytest.raises(UserError, match=r"^the channels of conv1 pass through ConstantPadNdBackward0, which maps 16 channels "
                                        r"to 32 .*; prune individual weights instead \(a run's config: prune\.granularity weight; the "
                                        r"Python API: rdprune\.estimate_curves, rdprune\.allocate and rdprune\.apply_masks\)$"):
        ChannelSpace(resnet20(10, 1), torch.zeros(1, 1, 28, 28))


def test_channel_granularity_without_torch_pruning_names_the_extra(monkeypatch, resnet):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(UserError, match=r"torch-pruning: pip install 'rdprune\[channels\]'$"):
        ChannelSpace(resnet, torch.zeros(1, 1, 28, 28))


@pytest.mark.parametrize("distortion", [{}, {"worst_case": True}, {"measure": "kl"}], ids=["mse", "worst", "kl"])
def test_channel_curves_equal_their_plain_definition(resnet, distortion, tmp_path):
    x = torch.randn(24, 1, 28, 28)
    space = ChannelSpace(resnet, x[:1])
    enforce_masks(space.layers, space.masks({"layer2.1.conv1": 5, "conv1": 2}))  # already partly pruned
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    fast = estimate_channel_curves(resnet, space, x, 6, batch_size=10, cache_dir=tmp_path, progress=False, **distortion)
    plain = plain_channel_curves(resnet, space, x, 6, batch_size=10, **distortion)
    assert all(torch.equal(v, resnet.state_dict()[k]) for k, v in before.items())
    for g in space.groups:
        scale = max(float(np.abs(plain[g].distortion).max()), 1e-30)
        np.testing.assert_allclose(fast[g].distortion, plain[g].distortion, rtol=0, atol=1e-6 * scale)
        np.testing.assert_array_equal(fast[g].amounts, plain[g].amounts)
        assert fast[g].distortion[0] == 0.0 and fast[g].distortion[-1] > 0
    assert fast["layer2.1.conv1"].amounts[0] == 5 / 32  # levels start at what is already removed
    again = estimate_channel_curves(resnet, space, x, 6, batch_size=10, cache_dir=tmp_path, progress=False, **distortion)
    assert all(np.array_equal(again[g].distortion, fast[g].distortion) for g in space.groups)


def test_channel_curve_pieces_join_to_the_whole_curve(resnet):
    x = torch.randn(16, 1, 28, 28)
    space = ChannelSpace(resnet, x[:1])
    whole = estimate_channel_curves(resnet, space, x, 9, groups=["layer3.0.conv1"], progress=False)["layer3.0.conv1"]
    n = len(group_plan(space, "layer3.0.conv1", 9, "relative").counts)
    parts = [estimate_channel_curves(resnet, space, x, 9, groups=["layer3.0.conv1"], level_ranges={"layer3.0.conv1": r},
                                     progress=False)["layer3.0.conv1"] for r in ((0, 4), (4, n))]
    np.testing.assert_array_equal(np.concatenate([p.distortion for p in parts]), whole.distortion)


def test_weight_and_flops_costs_count_what_the_smaller_model_has(resnet):
    x = torch.zeros(1, 1, 28, 28)
    space = ChannelSpace(resnet, x)
    flops = layer_flops(resnet, space.layers, (1, 28, 28))
    removal = {"layer1.0.conv1": 3, "layer2.0.conv2": 7, "layer3.2.conv1": 40}
    smaller = remove_channels(resnet, x, space.removed_indices(removal))
    weights = sum(m.weight.numel() for m in smaller.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert ChannelCost(space, "weights")(removal) == pytest.approx(weights, rel=1e-12)
    small_flops = sum(layer_flops(smaller, {n: m for n, m in smaller.named_modules() if n in space.layers}, (1, 28, 28)).values())
    assert ChannelCost(space, "flops", flops=flops)(removal) == pytest.approx(small_flops, rel=1e-12)


def test_an_unknown_budget_is_refused_with_the_budgets_named():
    space = ChannelSpace(DepthwiseConcat().eval(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown channel budget 'latenct': choose one of weights, flops, latency"):
        ChannelCost(space, "latenct")


def _brute_force(curves, plans, cost, limit):
    best = np.inf
    for levels in itertools.product(*(range(len(plans[g].counts)) for g in curves)):
        removal = {g: plans[g].counts[k] for g, k in zip(curves, levels)}
        if cost(removal) <= limit:
            best = min(best, sum(np.maximum.accumulate(curves[g].distortion)[k] for g, k in zip(curves, levels)))
    return best


@pytest.mark.parametrize("budget,fraction", [("weights", 0.6), ("weights", 0.35), ("flops", 0.5)])
def test_channel_allocation_meets_the_budget_between_the_bound_and_the_optimum(budget, fraction):
    model = lived_in(DepthwiseConcat())
    x = torch.randn(16, 3, 8, 8)
    space = ChannelSpace(model, x[:1])
    curves = estimate_channel_curves(model, space, x, 5, progress=False)
    plans = {g: group_plan(space, g, 5, "relative") for g in space.groups}
    cost = ChannelCost(space, budget, flops=layer_flops(model, space.layers, (3, 8, 8)))
    limit = fraction * cost.dense
    result = allocate_channels(curves, plans, cost, limit)
    optimum = _brute_force(curves, plans, cost, limit)
    assert cost(result.choice) <= limit and result.cost == cost(result.choice)
    assert result.lower_bound <= optimum + 1e-12 <= result.distortion + 2e-12


def _fixed_table(space: ChannelSpace) -> LatencyTable:
    """A latency table from fixed numbers: each layer's time proportional to its kept in x out channels."""
    grids = {}
    for name, (cin, cout) in space.kept_channels({}).items():
        kin, kout = tuple(range(1, cin + 1)), tuple(range(1, cout + 1))
        if isinstance(space.layers[name], nn.Conv2d) and space.layers[name].groups > 1:
            grids[name] = LayerGrid(kout, kout, 1e-6 * np.array(kout, float), depthwise=True)
        else:
            grids[name] = LayerGrid(kin, kout, 1e-6 * np.outer(kin, kout))
    return LatencyTable(grids, other=1e-5)


def _latency_problem(levels: int) -> tuple[ChannelSpace, ChannelCost, dict, dict]:
    """A depthwise network's groups under the fixed latency table, with their curves and level plans."""
    model = lived_in(DepthwiseConcat())
    x = torch.randn(16, 3, 8, 8)
    space = ChannelSpace(model, x[:1])
    cost = ChannelCost(space, "latency", latency=_fixed_table(space))
    curves = estimate_channel_curves(model, space, x, levels, progress=False)
    return space, cost, curves, {g: group_plan(space, g, levels, "relative") for g in space.groups}


def test_latency_budget_allocation_and_baselines_meet_the_predicted_budget():
    space, cost, curves, plans = _latency_problem(5)
    limit = 0.5 * cost.dense
    result = allocate_channels(curves, plans, cost, limit)
    assert cost(result.choice) <= limit and result.lower_bound is None
    current = {g: 0 for g in space.groups}
    for method in ("unif", "glob"):
        removal = channel_baseline(method, space, cost, limit, current)
        assert cost(removal) <= limit
    unif = channel_baseline("unif", space, cost, limit, current)
    fractions = [unif[g] / space.groups[g].size for g in space.groups]
    assert max(fractions) - min(fractions) <= max(1 / space.groups[g].size for g in space.groups)  # one ratio, rounded
    with pytest.raises(ValueError, match="budget cannot be met"):
        allocate_channels(curves, plans, cost, 1e-3 * cost.dense)


def test_allocate_levels_is_exact_against_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(40):
        curves, costs = {}, {}
        for u in range(4):
            k = int(rng.integers(2, 6))
            curves[f"u{u}"] = Curve(np.linspace(0, 0.9, k), np.cumsum(rng.random(k)) - rng.random())
            costs[f"u{u}"] = np.sort(rng.integers(0, 50, k))[::-1].copy()
        limit = int(rng.integers(20, 150))
        first = {n: int(rng.integers(0, 2)) for n in curves}
        try:
            levels, _ = allocate_levels(curves, costs, limit, first=first)
        except ValueError:
            assert sum(int(c.min()) for c in costs.values()) > limit
            continue
        best = min(
            sum(np.maximum.accumulate(curves[n].distortion)[k] for n, k in zip(curves, ks))
            for ks in itertools.product(*(range(first[n], len(c)) for n, c in costs.items()))
            if sum(costs[n][k] for n, k in zip(curves, ks)) <= limit
        )
        got = sum(np.maximum.accumulate(curves[n].distortion)[levels[n]] for n in curves)
        assert sum(costs[n][levels[n]] for n in curves) <= limit and got == pytest.approx(best, abs=1e-12)


def test_measured_latency_over_budget_is_corrected_by_re_solving():
    space, cost, curves, plans = _latency_problem(9)
    measured = []

    def measure(removal):  # the device runs 25 % slower than the table says, except the dense model
        measured.append(removal)
        return cost.dense, 1.25 * cost(removal)

    result = meet_measured_latency(lambda limit: allocate_channels(curves, plans, cost, limit).choice, measure, cost,
                                   cost.dense, 0.6, rounds=3)
    assert result.pruned_s <= 0.6 * result.dense_s and result.corrections >= 1
    assert result.model_error == pytest.approx(1 / 1.25 - 1)  # the first solution's prediction against its measurement
    assert result.absolute_error == pytest.approx(1 / 1.25 - 1)
    assert result.removal == measured[-1] and len(measured) == result.corrections + 1
    stubborn = meet_measured_latency(lambda limit: allocate_channels(curves, plans, cost, limit).choice,
                                     lambda removal: (cost.dense, 10 * cost(removal)), cost, cost.dense, 0.6, rounds=2)
    assert stubborn.corrections <= 2 and stubborn.pruned_s > 0.6 * stubborn.dense_s  # reported, not hidden




def test_a_model_fitted_to_the_dense_and_a_uniform_measurement_predicts_an_affine_runtime_exactly():
    """The runtime takes a fixed time per call plus 0.7 x what the table says: the table alone mispredicts the fraction of
    dense latency; fitted through the dense model and a uniform one measured together, the model is exact, the first
    solution meets the budget without correction, and the row keeps the table's own error beside it."""
    from rdprune.granularity.channel.baselines import channel_baseline

    space, cost, curves, plans = _latency_problem(9)
    overhead = 0.2 * cost.dense

    def measure(removal):
        return overhead + 0.7 * cost.dense, overhead + 0.7 * cost(removal)

    def solve(limit):
        return allocate_channels(curves, plans, cost, limit).choice

    uniform = channel_baseline("unif", space, cost, 0.6 * cost.dense)
    fitted = meet_measured_latency(solve, measure, cost, cost.dense, 0.6, rounds=3, reference=uniform)
    assert fitted.offset_s == pytest.approx(overhead) and fitted.scale == pytest.approx(0.7)
    assert fitted.model_error == pytest.approx(0.0, abs=1e-9) and fitted.corrections == 0
    assert fitted.pruned_s <= 0.6 * fitted.dense_s
    truth = (overhead + 0.7 * fitted.table_s) / (overhead + 0.7 * fitted.table_dense_s)
    assert fitted.table_error == pytest.approx((fitted.table_s / fitted.table_dense_s) / truth - 1)
    plain = meet_measured_latency(solve, measure, cost, cost.dense, 0.6, rounds=3)
    assert (plain.offset_s, plain.scale) == (0.0, 1.0) and plain.table_error == plain.model_error != pytest.approx(0.0)
    # a reference no faster than dense cannot define the line: the table is used as it is
    same = meet_measured_latency(solve, measure, cost, cost.dense, 0.6, rounds=3, reference=dict.fromkeys(space.groups, 0))
    assert (same.offset_s, same.scale) == (0.0, 1.0)



def test_a_fit_that_puts_the_budget_out_of_reach_falls_back_to_the_table(caplog):
    """A noisy fit with a large fixed part must not refuse a budget the table reaches: the measurement decides."""
    def solve(limit):
        if limit < 0.3:  # the most pruned model the table knows costs 0.3
            raise ValueError("out of reach")
        return {"t": limit}

    def measure(removal):
        return 1.0, 0.5 + 0.5 * removal["t"]  # 0.5 fixed + 0.5 x table: fitted budget 0.6 -> table limit 0.2

    with caplog.at_level(logging.WARNING, logger="rdprune.granularity.channel.allocation"):
        result = meet_measured_latency(solve, measure, lambda r: r["t"], 1.0, 0.6, rounds=0, reference={"t": 0.5})
    assert (result.offset_s, result.scale) == (0.0, 1.0) and result.removal == {"t": 0.6}
    assert "puts the budget out of reach" in caplog.text


def test_the_latency_check_logs_say_when_a_correction_was_needed(caplog):
    """A model under budget at the first measurement logs no correction; a correction names the overshoot that caused it."""
    removals = iter([{"a": 1}, {"a": 2}])
    times = {1: (0.200, 0.110), 2: (0.200, 0.095)}  # first over a budget of 0.5 * 200 ms, then within it

    def measure(removal):
        return times[removal["a"]]

    with caplog.at_level(logging.INFO, logger="rdprune.granularity.channel.allocation"):
        result = meet_measured_latency(lambda limit: next(removals), measure, lambda r: 0.1, 0.2, 0.5, rounds=3)
    assert result.corrections == 1
    assert [r.getMessage() for r in caplog.records] == [
        "latency check: the chosen model measures 110.000 ms against a budget of 100.000 ms (over by 10.0 %)",
        "latency correction 1 (the last model was over budget): re-solved, the new one measures 95.000 ms against "
        "a budget of 100.000 ms (met)",
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rdprune.granularity.channel.allocation"):
        under = meet_measured_latency(lambda limit: {"a": 2}, measure, lambda r: 0.1, 0.2, 0.5, rounds=3)
    assert under.corrections == 0
    assert [r.getMessage() for r in caplog.records] == [
        "latency check: the chosen model measures 95.000 ms against a budget of 100.000 ms (met)"]

class NormAcrossChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b, self.unused = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.norm(self.a(x)))).mean(dim=(2, 3))


def test_a_norm_across_channels_is_refused_and_an_uncalled_layer_is_no_unit():
    model = NormAcrossChannels().eval()
    with pytest.raises(UserError, match=r"^layer norm \(GroupNorm\) in the channel group of a has parameters but is not a "
                                        r"convolution, linear or BatchNorm layer: .*prune individual weights instead .*the Python API: "
                                        r"rdprune\.estimate_curves"):
        ChannelSpace(model, torch.zeros(1, 3, 8, 8))
    model.norm = nn.Identity()
    space = ChannelSpace(model, torch.zeros(1, 3, 8, 8))
    assert list(space.layers) == ["a", "b"] and list(space.groups) == ["a"]


def test_a_grouped_convolution_is_refused_with_the_fix_for_the_python_api_too():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 4, 8, 8))
    with pytest.raises(UserError, match=r"grouped convolution \(groups=2\).*the Python API: rdprune\.estimate_curves"):
        ChannelSpace(model, torch.zeros(1, 4, 8, 8))
