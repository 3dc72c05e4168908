"""Latency model: layer discovery, grids, interpolation, the rest-of-network term, JSON, building and timing."""
import itertools
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from rdprune.core.timing import LayerShape, layer_shapes, measure_latency
from rdprune.granularity.channel.curves import group_plan
from rdprune.granularity.channel.latency import LatencyTable, LayerGrid, channel_values, level_widths
from rdprune.granularity.channel.space import ChannelSpace


class SmallNet(nn.Module):
    """Declared out of call order: a strided conv, a depthwise conv, a 1x1 conv, pooling and a linear head."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.head = nn.Linear(2 * width, 5)
        self.pointwise = nn.Conv2d(width, 2 * width, 1, bias=False)
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.pointwise(self.depthwise(x)))
        return self.head(x.mean(dim=(2, 3)))


def fixed_table(other: float = 2e-3, seed: int = 0) -> LatencyTable:
    """A table from fixed numbers, increasing in every channel count, with one 2-d and one depthwise layer."""
    rng = np.random.default_rng(seed)
    conv = np.cumsum(np.cumsum(rng.uniform(1e-5, 1e-4, (3, 4)), axis=0), axis=1)
    depthwise = np.cumsum(rng.uniform(1e-5, 1e-4, 3))
    layers = {"conv": LayerGrid((1, 5, 9), (2, 4, 8, 16), conv, out_hw=(4, 4)),
              "dw": LayerGrid((1, 3, 9), (1, 3, 9), depthwise, out_hw=(8, 8), depthwise=True)}
    return LatencyTable(layers, other)


@pytest.fixture
def net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return SmallNet().eval(), torch.randn(2, 3, 16, 16)


def test_layer_shapes_follow_call_order_with_sizes(net):
    model, x = net
    shapes = layer_shapes(model, x)
    assert list(shapes) == ["stem", "depthwise", "pointwise", "head"]
    stem, dw, pw, head = shapes.values()
    assert (stem.kind, stem.in_channels, stem.out_channels, stem.kernel_size) == ("conv2d", 3, 16, (3, 3))
    assert (stem.stride, stem.padding) == ((2, 2), (1, 1))
    assert (stem.in_hw, stem.out_hw, stem.bias) == ((16, 16), (8, 8), True)
    assert dw.depthwise and dw.groups == 16 and dw.in_hw == dw.out_hw == (8, 8) and not dw.bias
    assert not pw.depthwise and (pw.in_channels, pw.out_channels, pw.out_hw) == (16, 32, (8, 8))
    assert head == LayerShape("head", "linear", 32, 5, bias=True)
    assert not any(m._forward_hooks for m in model.modules()), "layer_shapes must remove its hooks"


def test_channel_values_small_dims_every_count_large_dims_round_multiples():
    assert channel_values(7, 11) == tuple(range(1, 8))
    wide = channel_values(2048, 11)
    assert wide[0] == 1 and wide[-1] == 2048 and all(v % 16 == 0 for v in wide[1:]) and 9 <= len(wide) <= 12
    mid = channel_values(256, 11)
    assert mid[0] == 1 and mid[-1] == 256 and all(v % 8 == 0 for v in mid[1:]) and list(mid) == sorted(set(mid))
    assert channel_values(8, 3, multiple=2) == (2, 4, 8)  # a grouped conv's counts stay multiples of its groups
    with pytest.raises(ValueError):
        channel_values(64, 1)


def test_interpolation_exact_at_grid_points_and_bilinear_between():
    table = fixed_table()
    conv = table.layers["conv"]
    for a, kin in enumerate(conv.kept_in):
        for b, kout in enumerate(conv.kept_out):
            assert table.layer_time("conv", kin, kout) == conv.times[a, b]
    # (3, 6): halfway between in 1 and 5 and between out 4 and 8.
    t = conv.times
    assert table.layer_time("conv", 3, 6) == pytest.approx((t[0, 1] + t[0, 2] + t[1, 1] + t[1, 2]) / 4, rel=1e-12)
    # (6, 5): a quarter of the way from in 5 to 9 and from out 4 to 8.
    expected = 0.75 * 0.75 * t[1, 1] + 0.25 * 0.75 * t[2, 1] + 0.75 * 0.25 * t[1, 2] + 0.25 * 0.25 * t[2, 2]
    assert table.layer_time("conv", 6, 5) == pytest.approx(expected, rel=1e-12)
    dw = table.layers["dw"].times
    assert table.layer_time("dw", 3, 3) == dw[1]
    assert table.layer_time("dw", 5, 5) == pytest.approx(dw[1] + (dw[2] - dw[1]) / 3, rel=1e-12)


def test_queries_outside_the_table_are_errors():
    table = fixed_table()
    with pytest.raises(ValueError, match="outside"):
        table.layer_time("conv", 10, 4)
    with pytest.raises(ValueError, match="outside"):
        table.layer_time("conv", 5, 1)
    with pytest.raises(ValueError, match="depthwise"):
        table.layer_time("dw", 3, 9)
    with pytest.raises(KeyError):
        table.predict({"nope": (1, 1)})
    with pytest.raises(ValueError):
        LayerGrid((1, 4, 4), (2,), np.zeros((3, 1)))


def test_predict_of_the_dense_plan_is_dense_and_other_scales_with_output_activations():
    table = fixed_table(other=3e-3)
    layers_dense = table.layers["conv"].dense_time + table.layers["dw"].dense_time
    assert table.dense == table.predict({}) == table.predict({"conv": (9, 16), "dw": (9, 9)})
    assert table.dense == pytest.approx(layers_dense + 3e-3, rel=1e-12)
    # Without layer time, only the other term remains: other * kept output activations / dense ones.
    zero = LatencyTable({n: LayerGrid(g.kept_in, g.kept_out, np.zeros_like(g.times), g.out_hw, g.depthwise)
                         for n, g in table.layers.items()}, other=3e-3)
    dense_act = 16 * 16 + 9 * 64
    assert zero.predict({"conv": (1, 8), "dw": (3, 3)}) == pytest.approx(3e-3 * (8 * 16 + 3 * 64) / dense_act, rel=1e-12)


def test_predict_decreases_as_channels_are_removed():
    table = fixed_table()
    rng = np.random.default_rng(1)
    for _ in range(20):
        kin, kout, dw = 9, 16, 9
        previous = table.predict({})
        while (kin, kout, dw) != (1, 2, 1):
            k = rng.integers(3)
            if k == 0:
                kin = max(1, kin - 1)
            elif k == 1:
                kout = max(2, kout - 1)
            else:
                dw = max(1, dw - 1)
            now = table.predict({"conv": (kin, kout), "dw": (dw, dw)})
            assert now <= previous
            previous = now
        assert previous < table.dense


def test_json_round_trip_is_bit_identical():
    table = fixed_table(other=1.2345678901234567e-3)
    back = LatencyTable.from_json(json.loads(json.dumps(table.to_json())))
    rng = np.random.default_rng(2)
    for _ in range(50):
        plan = {"conv": (int(rng.integers(1, 10)), int(rng.integers(2, 17))), "dw": (d := int(rng.integers(1, 10)), d)}
        assert back.predict(plan) == table.predict(plan)
    assert back.dense == table.dense
    with pytest.raises(ValueError, match="format"):
        LatencyTable.from_json({"format": "something else", "layers": {}, "other": 0.0})


def layout_table() -> LatencyTable:
    """a -> b -> c, and c also adds a's output (a residual): each layer blocked at its dense counts, plain at some
    others, as ONNX Runtime runs them; every time zero, so that a prediction is its reorders alone."""
    from rdprune.core.runtimes import BLOCKED, BLOCKED_FROM_PLAIN, PLAIN

    def grid(kin, kout, layout):
        return LayerGrid(kin, kout, np.zeros((len(kin), len(kout))), out_hw=(4, 4), layout=layout)

    layers = {"a": grid((3,), (6, 8), [[BLOCKED_FROM_PLAIN, BLOCKED_FROM_PLAIN]]),
              "b": grid((6, 8), (5, 8), [[PLAIN, PLAIN], [BLOCKED, BLOCKED]]),
              "c": grid((5, 8), (8,), [[PLAIN], [BLOCKED]])}
    links = {"a": [], "b": [["a", 4, 4]], "c": [["b", 4, 4], ["a", 2, 2]]}
    return LatencyTable(layers, 0.0, links=links, reorder_s=1e-6)


def test_reorders_are_priced_where_linked_layers_leave_each_others_layout():
    """Per layer read from and direction, one reorder of its largest tensor, priced at reorder_s per channel x pixel,
    as a change from the dense model; a count off the grid adds nothing; JSON keeps it all."""
    table = layout_table()
    assert table.dense == 0.0 and table.reorders({}) == 0.0  # dense: every link blocked to blocked (a reads the image)
    # b reads 6 channels: plain; a writes blocked, so its output is reordered out once (6 x 16) for b, and b's plain
    # output is reordered into the blocked layout for c (8 x 16)
    assert table.predict({"a": (3, 6), "b": (6, 8)}) == pytest.approx(1e-6 * (6 * 16 + 8 * 16))
    # b and c plain: a's output out of the blocked layout once, the largest of its two tensors (6 x 16 for b, not
    # 6 x 4 for c); b's plain output to c's plain input: no reorder
    assert table.predict({"a": (3, 6), "b": (6, 5), "c": (5, 8)}) == pytest.approx(1e-6 * 6 * 16)
    # only c plain: b's and a's blocked outputs both reordered out for it (5 x 16 and 8 x 4)
    assert table.predict({"b": (8, 5), "c": (5, 8)}) == pytest.approx(1e-6 * (5 * 16 + 8 * 4))
    assert table.predict({"b": (7, 8)}) == 0.0  # 7 input channels were not timed: no layout known, no reorder priced
    back = LatencyTable.from_json(json.loads(json.dumps(table.to_json())))
    assert back.predict({"b": (8, 5), "c": (5, 8)}) == table.predict({"b": (8, 5), "c": (5, 8)})
    assert back.links == table.links and back.reorder_s == table.reorder_s
    with pytest.raises(ValueError, match="links name layers not in the table"):
        LatencyTable(table.layers, 0.0, links={"b": [["z", 1, 1]]}, reorder_s=1e-6)
    with pytest.raises(ValueError, match="layout must hold"):
        LayerGrid((1, 2), (1, 2), np.zeros((2, 2)), layout=[[0, 3], [1, 1]])


def test_build_on_a_tiny_net(net, one_thread):
    model, x = net
    shapes = layer_shapes(model, x)
    threads = torch.get_num_threads()
    table = LatencyTable.build(model, x, shapes, threads=1, time_limit_s=20.0, channel_grid={"pointwise": ((4, 16), (8, 32))})
    assert torch.get_num_threads() == threads
    assert list(table.layers) == list(shapes)
    assert table.dense > 0 and table.other >= 0
    assert table.dense == pytest.approx(table.meta["measured_dense"], rel=1e-9)
    assert table.layers["pointwise"].kept_in == (4, 16) and table.layers["pointwise"].kept_out == (8, 32)
    assert table.layers["depthwise"].depthwise and table.layers["depthwise"].kept_in[-1] == 16
    assert table.layers["stem"].kept_in == (1, 2, 3)
    assert all(t > 0 for g in table.layers.values() for t in np.ravel(g.times))
    back = LatencyTable.from_json(json.loads(json.dumps(table.to_json())))
    plan = {"stem": (3, 9), "depthwise": (9, 9), "pointwise": (9, 20), "head": (20, 5)}
    assert back.predict(plan) == table.predict(plan) > 0


def test_level_widths_are_the_counts_every_allocation_gives_and_the_table_times_exactly_those(net, one_thread):
    """latency.grid levels: each layer's axes are the (in, out) counts over every combination of the groups'
    levels (brute force), and the table is timed at those counts, not at more or fewer."""
    model, x = net
    space = ChannelSpace(model, x[:1])
    plans = {g: group_plan(space, g, 5, "relative") for g in space.groups}
    widths = level_widths(space, plans)
    seen = {n: (set(), set()) for n in space.layers}
    for levels in itertools.product(*(p.counts for p in plans.values())):
        for n, (i, o) in space.kept_channels(dict(zip(plans, levels))).items():
            seen[n][0].add(i)
            seen[n][1].add(o)
    assert widths == {n: (tuple(sorted(ins)), tuple(sorted(outs))) for n, (ins, outs) in seen.items()}
    assert widths["stem"][0] == (3,) and widths["head"][1] == (5,) and len(widths["pointwise"][1]) == 5
    table = LatencyTable.build(model, x, layer_shapes(model, x), channel_grid=widths, points=2, threads=1, time_limit_s=1e6)
    assert table.covers(widths) and table.meta["channel_grid"]["pointwise"] == [list(a) for a in widths["pointwise"]]
    for n, (ins, outs) in widths.items():
        grid = table.layers[n]
        assert grid.kept_out == outs and grid.kept_in == (outs if grid.depthwise else ins), n


def test_a_table_covers_the_counts_it_timed_or_was_asked_for():
    """What decides whether an iteration times its table again: counts timed, or asked for and coarsened away by
    the time limit (timing again would coarsen them again), survive the JSON round trip."""
    table = fixed_table()  # conv: (1, 5, 9) x (2, 4, 8, 16); depthwise: (1, 3, 9)
    assert table.covers({"conv": ((1, 9), (4, 16)), "dw": ((3, 9), (3, 9))})
    assert not table.covers({"conv": ((1, 9), (5, 16))}) and not table.covers({"dw": ((2,), (2,))})
    table.meta["channel_grid"] = {"conv": [[1, 5, 9], [2, 4, 5, 8, 16]]}
    back = LatencyTable.from_json(json.loads(json.dumps(table.to_json())))
    assert back.covers({"conv": ((1, 9), (5, 16))}) and not back.covers({"conv": ((1, 9), (6, 16))})


def test_channel_grid_overrides_must_include_the_dense_count(net):
    model, x = net
    with pytest.raises(ValueError, match="dense count"):
        LatencyTable.build(model, x, layer_shapes(model, x), channel_grid={"pointwise": ((4, 8), (8, 32))})


def test_time_limit_coarsens_the_grids(one_thread, caplog):
    torch.manual_seed(0)
    model, x = SmallNet(width=48).eval(), torch.randn(1, 3, 8, 8)
    shapes = layer_shapes(model, x)
    full = LatencyTable.build(model, x, shapes, threads=1, time_limit_s=1e6)
    with caplog.at_level(logging.WARNING, logger="rdprune.granularity.channel.latency"):
        tight = LatencyTable.build(model, x, shapes, threads=1, time_limit_s=1e-3)
    assert any("coarsening" in r.getMessage() for r in caplog.records)

    def count(table: LatencyTable) -> int:
        return sum(np.size(g.times) for g in table.layers.values())

    assert count(tight) < count(full)
    for name, g in tight.layers.items():
        dense = full.layers[name]
        assert len(g.kept_in) >= min(2, len(dense.kept_in)) and g.kept_in[0] == dense.kept_in[0] and g.kept_in[-1] == dense.kept_in[-1]
        assert g.kept_out[-1] == dense.kept_out[-1]


def test_measure_latency_one_median_per_model_and_more_work_is_slower(one_thread):
    torch.manual_seed(0)
    small = nn.Conv2d(32, 32, 3, padding=1).eval()
    large = nn.Conv2d(32, 256, 3, padding=1).eval()  # 8 times the FLOPs
    threads = torch.get_num_threads()
    times = measure_latency([small, large], torch.randn(1, 32, 32, 32), repeats=9, warmup=2, threads=1)
    assert torch.get_num_threads() == threads
    assert len(times) == 2 and all(t > 0 for t in times)
    assert times[1] > times[0]


def test_build_rejects_shapes_the_forward_pass_does_not_call(net):
    model, x = net
    shapes = dict(layer_shapes(model, x))
    model.unused = nn.Linear(4, 4)
    shapes["unused"] = LayerShape("unused", "linear", 4, 4)
    with pytest.raises(ValueError, match="does not call"):
        LatencyTable.build(model, x, shapes, threads=1, time_limit_s=5.0)
