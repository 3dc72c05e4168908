import logging
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from rdprune.core.curves import (
    curve_costs,
    estimate_curves,
    layer_amounts,
    merge_curve_pieces,
    plain_curves,
    synthetic_inputs,
)
from rdprune.core.layers import prunable_layers
from rdprune.core.masks import apply_masks
from rdprune.models.cifar_resnet import resnet20, resnet32

from tiny_models import Branchy, NoPrunable

pytestmark = pytest.mark.usefixtures("one_thread")


class SharedAndFlat(nn.Module):
    """One conv used twice (weight sharing), a size-dependent view, a side branch that never reaches the output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.stem = nn.Conv2d(3, 4, 1)
        self.unused = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        x = self.stem(x)
        _ = self.unused(x)
        x = self.conv(torch.tanh(self.conv(x)))
        return self.fc(x.view(x.size(0), -1))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = torch.relu(h)
        return self.b(h)


class InPlaceReadLater(nn.Module):
    """An in-place update whose effect the traced graph's edges do not show: not safe to split."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        h.add_(self.b(h))
        return self.c(h)


class InPlaceSuffix(nn.Module):
    """Pruning b: its suffix updates its own input h in place."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.c(h.add_(self.b(h)))


class InPlacePrefix(nn.Module):
    """Pruning b: h, which b reads, is updated in place after b ran, outside b's suffix."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        y = self.b(h)
        return self.c(y + torch.relu_(h))


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x), x


class NanOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) * float("nan")


def _model(cls, seed=0):
    torch.manual_seed(seed)
    model = cls()
    for m in model.modules():  # non-trivial BatchNorm statistics, so eval mode matters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _assert_close(fast, plain):
    assert list(fast) == list(plain)
    for name in plain:
        np.testing.assert_array_equal(fast[name].amounts, plain[name].amounts)
        scale = np.abs(plain[name].distortion).max()
        assert np.abs(fast[name].distortion - plain[name].distortion).max() <= 1e-6 * scale, name


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _assert_restored(model, snapshot):
    state, modes = snapshot
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
@pytest.mark.parametrize("grid", ["relative", "absolute"])
@pytest.mark.parametrize("distortion", [{}, {"worst_case": True}, {"measure": "kl"}, {"measure": "kl", "worst_case": True}],
                         ids=["mse", "worst", "kl", "kl_worst"])
@pytest.mark.parametrize("cls,shape", [(Branchy, (3, 8, 8)), (SharedAndFlat, (3, 6, 6))], ids=["branchy", "shared"])
def test_matches_plain_definition(cls, shape, distortion, grid, pruned, caplog):
    model = _model(cls)
    if pruned:
        apply_masks(model, {n: 0.2 + 0.15 * i for i, n in enumerate(prunable_layers(model))})
    model.train()  # estimation must still use eval mode, and restore this afterwards
    snapshot = _snapshot(model)
    batches = [synthetic_inputs(5, shape, seed=s) for s in range(3)]  # multi-batch, uneven is fine too
    fast = estimate_curves(model, batches, 9, grid=grid, progress=False, **distortion)
    _assert_restored(model, snapshot)
    assert not caplog.records  # the traced fast path, no fallback
    plain = plain_curves(model, batches, 9, grid=grid, **distortion)
    _assert_close(fast, plain)
    assert all(c.distortion[0] == 0.0 for c in fast.values())
    if cls is SharedAndFlat:
        assert np.all(fast["unused"].distortion == 0.0)


def test_tensor_input_is_split_into_batches():
    model = _model(Branchy)
    x = synthetic_inputs(11, (3, 8, 8))
    _assert_close(estimate_curves(model, x, 5, batch_size=4, worst_case=True, progress=False), plain_curves(model, [x], 5, worst_case=True))
    _assert_close(estimate_curves(model, x, 5, batch_size=4, progress=False), plain_curves(model, [x], 5))


def test_relative_grid_spans_the_remaining_weights_and_full_layer_has_one_level():
    model = _model(Branchy)
    apply_masks(model, {"left": 0.5, "right": 1.0})
    curves = estimate_curves(model, synthetic_inputs(4, (3, 8, 8)), 5, progress=False)
    # left: 128 weights, 16 output units: its floor keeps 16 weights, so the grid tops out at 7/8;
    # right, pruned whole before the floor existed, keeps its one level and is not made denser
    np.testing.assert_allclose(curves["left"].amounts, [0.5, 0.59375, 0.6875, 0.78125, 0.875])
    np.testing.assert_array_equal(curves["right"].amounts, [1.0])
    np.testing.assert_array_equal(curves["right"].distortion, [0.0])
    assert curves["left"].distortion[0] == 0.0 and curves["left"].distortion[-1] > 0


def test_absolute_grid_levels_below_current_sparsity_are_zero_without_a_forward_pass():
    model = _model(Branchy)
    apply_masks(model, {"stem": 0.5})
    calls = []
    model.stem.register_forward_pre_hook(lambda m, a: calls.append(1))
    batches = [synthetic_inputs(3, (3, 8, 8), seed=s) for s in range(3)]
    curves = estimate_curves(model, batches, 11, grid="absolute", layers=["stem"], progress=False)
    d = curves["stem"].distortion
    assert np.all(d[:6] == 0.0) and np.all(d[6:] > 0)
    # 5 levels above 50 % on 3 batches, plus at most one unpruned reference pass per batch and a trace check
    assert len(calls) <= 5 * 3 + 3 + 1
    _assert_close(curves, plain_curves(model, batches, 11, grid="absolute", layers=["stem"]))


def test_untraceable_model_falls_back_with_a_warning_and_matches(caplog):
    model = _model(Untraceable)
    x = synthetic_inputs(8, (6,))
    with caplog.at_level(logging.WARNING, logger="rdprune.core.curves"):
        fast = estimate_curves(model, x, 6, batch_size=3, progress=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "traced" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()
    _assert_close(fast, plain_curves(model, x, 6, batch_size=3))


@pytest.mark.parametrize("cls,messages", [
    # not traceable as it is; replaying a's output fails too, as b's sum lands in it: b and c take the plain loop
    (InPlaceReadLater, ["cannot be traced", "layer b: the output of a is changed in place", "layer c: the output of a is changed"]),
    (InPlaceSuffix, ["layer b"]),
    (InPlacePrefix, ["layer b"]),
])
def test_in_place_updates_fall_back_to_the_plain_loop(cls, messages, caplog):
    model = _model(cls)
    x = synthetic_inputs(7, (6,))
    with caplog.at_level(logging.WARNING, logger="rdprune.core.curves"):
        fast = estimate_curves(model, x, 5, batch_size=3, worst_case=True, progress=False)
    assert len(caplog.records) == len(messages) and all(m in r.getMessage() for m, r in zip(messages, caplog.records)), caplog.text
    _assert_close(fast, plain_curves(model, x, 5, batch_size=3, worst_case=True))


def test_level_range_pieces_merge_to_the_full_curve_and_layer_subset_is_a_restriction():
    model = _model(Branchy)
    apply_masks(model, {"right": 0.3})
    x = synthetic_inputs(6, (3, 8, 8))
    full = estimate_curves(model, x, 7, progress=False)
    n = len(layer_amounts(model.right, 7))
    pieces = [estimate_curves(model, x, 7, layers=["right"], level_ranges={"right": r}, progress=False)["right"]
              for r in [(4, n), (0, 2), (2, 4)]]
    merged = merge_curve_pieces(pieces)
    np.testing.assert_array_equal(merged.amounts, full["right"].amounts)
    np.testing.assert_array_equal(merged.distortion, full["right"].distortion)
    subset = estimate_curves(model, x, 7, layers=["depthwise", "stem"], progress=False)
    assert list(subset) == ["stem", "depthwise"]  # declaration order
    for name, curve in subset.items():
        np.testing.assert_array_equal(curve.distortion, full[name].distortion)
    with pytest.raises(ValueError, match="overlap"):
        merge_curve_pieces([pieces[1], pieces[1]])
    with pytest.raises(ValueError, match="level range"):
        estimate_curves(model, x, 7, level_ranges={"right": (3, 3)}, progress=False)


def test_cache_resumes_an_interrupted_run_and_ignores_a_changed_model(tmp_path):
    model = _model(Branchy)
    x = synthetic_inputs(6, (3, 8, 8))
    layers = prunable_layers(model)  # declaration order: head, right, stem, left, depthwise
    pruned_seen: list[str] = []

    def watch(name):
        def hook(module, args):
            if bool((module.weight == 0).any()):
                pruned_seen.append(name)
        return hook

    handles = [m.register_forward_pre_hook(watch(n)) for n, m in layers.items()]

    def interrupt(module, args):
        if bool((module.weight == 0).any()):
            raise KeyboardInterrupt

    stop = model.left.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        estimate_curves(model, x, 5, cache_dir=tmp_path, progress=False)
    stop.remove()
    assert model.left.weight.ne(0).all()  # restored even when interrupted
    pruned_seen.clear()
    resumed = estimate_curves(model, x, 5, cache_dir=tmp_path, progress=False)
    assert set(pruned_seen) == {"left", "depthwise"}
    _assert_close(resumed, plain_curves(model, x, 5))

    pruned_seen.clear()
    again = estimate_curves(model, x, 5, cache_dir=tmp_path, progress=False)
    assert pruned_seen == []
    assert all(np.array_equal(again[n].distortion, resumed[n].distortion) for n in layers)

    with torch.no_grad():
        model.stem.bias.add_(0.1)  # not even a prunable weight: the cache must still be stale
    changed = estimate_curves(model, x, 5, cache_dir=tmp_path, progress=False)
    assert set(pruned_seen) == set(layers)
    _assert_close(changed, plain_curves(model, x, 5))
    pruned_seen.clear()
    estimate_curves(model, x, 5, cache_dir=tmp_path, worst_case=True, progress=False)
    assert set(pruned_seen) == set(layers)
    for h in handles:
        h.remove()


def test_deterministic_and_model_restored():
    model = _model(Branchy)
    snapshot = _snapshot(model)
    x = synthetic_inputs(6, (3, 8, 8))
    a = estimate_curves(model, x, 6, progress=False)
    b = estimate_curves(model, x, 6, progress=False)
    assert all(np.array_equal(a[n].distortion, b[n].distortion) for n in a)
    _assert_restored(model, snapshot)
    assert not hasattr(model, "_tensor_constant0")


def test_bad_inputs_raise_value_error():
    x = synthetic_inputs(4, (4,))
    with pytest.raises(ValueError, match="NaN or inf"):
        estimate_curves(NanOut(), x, 3, progress=False)
    with pytest.raises(ValueError, match="no prunable layer"):
        estimate_curves(NoPrunable(), x, 3, progress=False)
    with pytest.raises(ValueError, match="one tensor"):
        estimate_curves(TupleOut(), x, 3, progress=False)
    with pytest.raises(ValueError, match="not among the prunable"):
        estimate_curves(_model(Branchy), synthetic_inputs(2, (3, 8, 8)), 3, layers=["nope"], progress=False)
    with pytest.raises(ValueError, match="calibration inputs"):
        estimate_curves(_model(Branchy), [], 3, progress=False)


def test_curve_costs_count_only_the_suffix():
    model = _model(Branchy)
    apply_masks(model, {"left": 0.5})
    costs = curve_costs(model, (3, 8, 8), 11, "absolute")
    assert costs["head"] == (2 * 24 * 5, 10)  # the head re-runs alone
    assert costs["left"][1] == 4  # 0.6, 0.7, 0.8 and its floor 0.875 (16 of 128 weights kept)
    assert costs["stem"][0] > costs["left"][0] > costs["depthwise"][0] > costs["head"][0]


def test_synthetic_inputs_are_seeded_normal_noise():
    a = synthetic_inputs(500, (2, 3), seed=3)
    assert a.shape == (500, 2, 3) and torch.equal(a, synthetic_inputs(500, (2, 3), seed=3))
    assert abs(float(a.mean())) < 0.1 and abs(float(a.std()) - 1) < 0.1


def test_cifar_resnets_have_the_papers_shape():
    for build, n_layers in [(resnet20, 20), (resnet32, 32)]:
        model = build()
        assert len(prunable_layers(model)) == n_layers  # 6n+1 convs + fc; option-A shortcuts add none
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in resnet20().parameters()) == 269_722  # 0.27 M in the paper


def test_cifar_resnet20_subset_matches_plain():
    model = _model(resnet20)
    x = synthetic_inputs(4, (3, 32, 32))
    names = ["conv1", "layer2.0.conv1", "layer3.2.conv2", "fc"]
    _assert_close(estimate_curves(model, x, 4, grid="absolute", layers=names, progress=False),
                  plain_curves(model, x, 4, grid="absolute", layers=names))


@pytest.mark.parametrize("arch,names", [
    ("mobilenet_v2", ["features.0.0", "features.4.conv.1.0", "features.17.conv.2", "classifier.1"]),
    ("resnet18", ["conv1", "layer2.0.conv2", "layer2.0.downsample.0", "fc"]),  # in-place ReLUs, residual adds
])
def test_torchvision_subset_matches_plain_without_fallback(arch, names, caplog):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=10)
    x = synthetic_inputs(2, (3, 32, 32))
    fast = estimate_curves(model, x, 3, layers=names, progress=False)
    assert not caplog.records
    _assert_close(fast, plain_curves(model, x, 3, layers=names))


# --- The grid's top level is each layer's floor (issue 9, defect 4) --------------------------------

class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_level_amounts_stop_at_the_floor():
    from rdprune.core.grid import level_amounts

    np.testing.assert_allclose(level_amounts(11, "absolute", 0.0, 0.875), [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.875])
    np.testing.assert_allclose(level_amounts(5, "relative", 0.5, 0.875), [0.5, 0.59375, 0.6875, 0.78125, 0.875])
    assert level_amounts(5, "relative", 0.2, 0.875)[-1] == 0.875
    # a layer already sparser than its floor allows keeps its sparsity as its only (top) level
    np.testing.assert_array_equal(level_amounts(5, "relative", 0.95, 0.875), [0.95])
    np.testing.assert_allclose(level_amounts(11, "absolute", 0.95, 0.875), [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95])
    np.testing.assert_array_equal(level_amounts(3, "absolute", 0.0, 0.0), [0.0])  # fan-in 1: never pruned
    np.testing.assert_allclose(level_amounts(3, "relative", 0.0), [0, 0.5, 1])  # no floor given: up to 1
    with pytest.raises(ValueError, match=r"max_amount must be in \[0, 1\], got 1.5"):
        level_amounts(3, "relative", 0.0, 1.5)


@pytest.mark.parametrize("grid", ["absolute", "relative"])
def test_coarse_one_shot_to_98_percent_never_prunes_a_layer_past_its_floor(grid):
    from rdprune.core.allocation import allocate
    from rdprune.core.floor import max_amounts

    model = _model(SmallCNN)
    layers = prunable_layers(model)
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    x = synthetic_inputs(8, (3, 8, 8))
    curves = estimate_curves(model, x, 11, grid=grid, worst_case=True, progress=False)
    tops = max_amounts(layers)
    assert tops == {"conv1": (432 - 16) / 432, "conv2": (4608 - 32) / 4608, "fc": (320 - 10) / 320}  # one weight per output unit
    for n, c in curves.items():
        assert c.amounts[-1] == tops[n] and np.all(c.amounts <= tops[n])
    _assert_close(curves, plain_curves(model, x, 11, grid=grid, worst_case=True))
    amounts = allocate(curves, sizes, 0.98)
    assert all(amounts[n] <= tops[n] for n in layers)
    apply_masks(model, amounts)
    assert all(int((m.weight != 0).sum()) >= m.weight.shape[0] for m in layers.values())
    assert sum(int((m.weight != 0).sum()) for m in layers.values()) <= 0.02 * sum(sizes.values())
    # a raised floor tops every grid there, and a target it rules out is a clear error
    raised = estimate_curves(_model(SmallCNN), x, 11, grid=grid, worst_case=True, progress=False, min_density=0.05)
    assert {n: c.amounts[-1] for n, c in raised.items()} == {n: (s - math.ceil(0.05 * s)) / s for n, s in sizes.items()}
    with pytest.raises(ValueError, match="budget cannot be met"):
        allocate(raised, sizes, 0.98)


def test_the_floor_is_part_of_the_cache_key(tmp_path):
    model = _model(SmallCNN)
    x = synthetic_inputs(6, (3, 8, 8))
    first = estimate_curves(model, x, 5, cache_dir=tmp_path, progress=False)
    raised = estimate_curves(model, x, 5, cache_dir=tmp_path, progress=False, min_density=0.2)
    assert {n: c.amounts[-1] for n, c in raised.items()} == {"conv1": (432 - 87) / 432, "conv2": (4608 - 922) / 4608, "fc": 0.8}
    _assert_close(raised, plain_curves(model, x, 5, min_density=0.2))
    costs = curve_costs(model, (3, 8, 8), 5, "relative", min_density=0.2)
    assert all(costs[n][1] == 4 for n in raised)
    again = estimate_curves(model, x, 5, cache_dir=tmp_path, progress=False)
    _assert_close(again, first)
    with pytest.raises(ValueError, match=r"min_density must be a fraction in \[0, 1\)"):
        estimate_curves(model, x, 5, progress=False, min_density=-0.1)


class AliasInSuffix(nn.Module):
    """Pruning a: the ReLUs read values that others still read (the same tensor handed on by
    Identity, a view), so neither may overwrite its argument; the sums may."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)
        self.same = nn.Identity()

    def forward(self, x):
        h = self.a(x)
        r = torch.relu(self.same(h))
        v = torch.relu(h.view(-1, 6))
        return self.c(self.b(r) + h + v)


def test_suffix_reuses_buffers_only_where_nothing_else_reads_them(caplog):
    from rdprune.core.suffix import TracedNetwork

    model = _model(AliasInSuffix)
    x = synthetic_inputs(5, (6,))
    network = TracedNetwork(model, prunable_layers(model).values())
    plan = network.plan(model.a)
    kinds = sorted(kind for kind, _ in plan.reuse.values())
    assert kinds == ["add", "add", "relu", "relu"]  # candidates by the graph; the tensors decide at run time
    boundary = network.boundary_values(plan, x)
    with torch.no_grad():
        assert torch.equal(network.run_suffix(plan, boundary), model(x))
    fast = estimate_curves(model, x, 6, grid="absolute", progress=False)
    assert not caplog.records
    _assert_close(fast, plain_curves(model, x, 6, grid="absolute"))
    resnet = _model(resnet20)
    network = TracedNetwork(resnet, prunable_layers(resnet).values())
    plan = network.plan(resnet.layer1[0].conv1)
    # per block: the first ReLU, the residual sum and the ReLU after it write into their argument
    assert len(plan.reuse) == 3 * 9


def test_forward_walker_serves_layers_in_graph_order_with_one_forward_pass():
    from rdprune.core.suffix import TracedNetwork

    model = _model(resnet20).eval()
    layers = prunable_layers(model)
    network = TracedNetwork(model, layers.values())
    x = synthetic_inputs(3, (3, 32, 32))
    calls = []
    execute = network.execute
    network.execute = lambda node, env: calls.append(node) or execute(node, env)
    walker = network.walker(x)
    with torch.no_grad():
        for module in layers.values():
            plan = network.plan(module)
            served = network.boundary_from(walker, plan)
            network.execute = execute
            expected = network.boundary_values(plan, x)
            network.execute = lambda node, env: calls.append(node) or execute(node, env)
            assert served.keys() == expected.keys() and all(torch.equal(served[n], expected[n]) for n in served)
    assert walker.restarts == 0 and len(calls) == len(set(calls))  # every node computed at most once
    assert len(walker.env) <= 3  # what a forward pass holds at that point, not every value


def test_cached_multi_batch_run_is_grouped_and_resumes_by_group(tmp_path, monkeypatch):
    import rdprune.core.curves as curves_module

    monkeypatch.setattr(curves_module, "_CACHED_GROUP", 4)
    model = _model(resnet20)
    layers = list(prunable_layers(model))
    x = synthetic_inputs(6, (3, 8, 8))
    target = dict(model.named_modules())[layers[5]]  # in the second group of four

    def interrupt(module, args):
        if bool((module.weight == 0).any()):
            raise KeyboardInterrupt

    stop = target.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        estimate_curves(model, x, 4, grid="absolute", batch_size=2, cache_dir=tmp_path, progress=False)
    stop.remove()
    assert len(list(tmp_path.glob("*.curve.pt"))) == 4  # the first group, finished with its last batch
    resumed = estimate_curves(model, x, 4, grid="absolute", batch_size=2, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.curve.pt"))) == len(layers)
    _assert_close(resumed, plain_curves(model, x, 4, grid="absolute", batch_size=2))
    worst = estimate_curves(model, x, 4, grid="absolute", batch_size=2, worst_case=True, progress=False)
    _assert_close(worst, plain_curves(model, x, 4, grid="absolute", batch_size=2, worst_case=True))


def test_bench_report_interleaves_the_sides_and_summarises_repetitions(tmp_path):
    from rdprune.bench.report import git_commit, interleaved, machine_line, pair_ratios, spread

    order = []
    runs = interleaved({"fast": lambda: order.append("fast") or 1, "plain": lambda: order.append("plain") or 2}, 3)
    assert order == ["fast", "plain", "plain", "fast", "fast", "plain"]
    assert [t.result for t in runs["plain"]] == [2, 2, 2] and all(t.wall >= 0 and t.cpu >= 0 for t in runs["fast"])
    s = spread([3.0, 1.0, 2.0])
    assert (s.median, s.low, s.high, s.n) == (2.0, 1.0, 3.0, 3)
    assert s.format("s") == "2.00 s [1.00-3.00]" and s.format("x") == "2.00x [1.00-3.00]"
    assert pair_ratios([4.0, 9.0], [2.0, 3.0]) == [2.0, 3.0]
    assert git_commit(tmp_path) is None  # outside a git checkout: no commit, no error
    line = machine_line(threads=1)
    assert "cores" in line and "1 thread;" in line and "commit" in line


class SortedTwice(nn.Module):
    """An item of a tuple read twice: overwriting it in place for one reader would change the other."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        s = torch.sort(self.conv1(x), 1)
        y = torch.relu(s[0]) + s[0] * 2
        return self.fc(self.conv2(y).flatten(1))


def test_tuple_items_read_twice_are_never_overwritten_in_place():
    torch.manual_seed(0)
    model, x = SortedTwice().eval(), torch.randn(8, 3, 6, 6)
    fast = estimate_curves(model, x, 5, progress=False)
    plain = plain_curves(model, x, 5)
    for name in plain:
        np.testing.assert_allclose(fast[name].distortion, plain[name].distortion, rtol=1e-6, atol=1e-12, err_msg=name)
