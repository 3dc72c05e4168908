"""Runtimes of latency budgets (issue 21): ONNX Runtime's tables, the table key, round_to, deploy marking, bad input."""
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rdprune.core.grid import Curve
from rdprune.core.runtimes import (
    BLOCKED,
    PLAIN,
    LayerKernels,
    OnnxRuntime,
    TorchRuntime,
    graph_links,
    make_runtime,
)
from rdprune.core.timing import layer_shapes
from rdprune.errors import UserError
from rdprune.granularity.channel.allocation import allocate_channels
from rdprune.granularity.channel.costs import ChannelCost
from rdprune.granularity.channel.curves import group_plan
from rdprune.granularity.channel.deploy import mark_deploy, summary_line
from rdprune.granularity.channel.latency import LatencyTable
from rdprune.granularity.channel.space import ChannelSpace
from rdprune.granularity.channel.stage import check_round_to, table_key_problem

from cli_errors import user_error
from launch import read_rows, run_ok

pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parent.parent


class SmallNet(nn.Module):
    """conv-BN-ReLU twice, pooling, a linear head: two channel groups (16 and 24 channels)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return SmallNet().eval()


def test_onnxruntime_table_is_built_by_onnxruntime(monkeypatch):
    """A spy on the runtime's single-layer graphs and profile: the ONNX Runtime table times what ONNX Runtime runs."""
    model, x = _net(), torch.randn(2, 3, 12, 12)
    shapes = layer_shapes(model, x)
    runtime = OnnxRuntime(threads=1, optimization="extended")
    seen, profiled = [], []
    layer_calls, inside_times = OnnxRuntime.layer_calls, OnnxRuntime.inside_times

    def spy_calls(self, shape, batch, kept_in, outs, groups, activation, residual=False):
        seen.append((shape.name, kept_in, tuple(outs), activation))
        return layer_calls(self, shape, batch, kept_in, outs, groups, activation, residual)

    def spy_inside(self, *args, **kwargs):
        result = inside_times(self, *args, **kwargs)
        profiled.append(result)
        return result

    monkeypatch.setattr(OnnxRuntime, "layer_calls", spy_calls)
    monkeypatch.setattr(OnnxRuntime, "inside_times", spy_inside)
    table = LatencyTable.build(model, x, shapes, points=3, time_limit_s=30.0, runtime=runtime)
    assert table.meta["runtime"] == "onnxruntime" and table.meta["optimization"] == "extended"
    assert table.meta["threads"] == 1 and table.meta["batch"] == 2 and table.meta["device"] == "cpu"
    assert {name for name, *_ in seen} == set(shapes)  # every layer was timed by ONNX Runtime's sessions
    assert ("conv1", 3, (1, 8, 16), True) in seen  # BatchNorm + ReLU follow conv1: the fused activation is timed
    assert not any(act for name, *_, act in seen if name == "head")
    dense_s, inside = profiled[0]
    assert set(inside) == set(shapes)  # every layer found in ONNX Runtime's profile of the exported model
    for name, grid in table.layers.items():  # each grid's dense point is the layer's time inside the model
        assert grid.dense_time == pytest.approx(inside[name], rel=1e-9)
    assert table.dense == pytest.approx(dense_s, rel=1e-9)
    assert table.other >= 0 and table.predict({"conv1": (3, 8), "conv2": (8, 24), "head": (24, 5)}) > 0
    assert LatencyTable.from_json(json.loads(json.dumps(table.to_json()))).meta == table.meta


def test_onnxruntime_table_corrects_only_the_points_the_dense_kernels_run(monkeypatch):
    """Injected kernel times and paths: each layer's points on its dense point's kernel path are scaled to its time
    inside the model, points on another path (ONNX Runtime leaves the blocked layout for odd widths) keep theirs."""
    from rdprune.core.runtimes import ProfiledLayerCall

    model, x = _net(), torch.randn(2, 3, 12, 12)
    shapes = layer_shapes(model, x)

    def kernels(self):
        kept_out = self.session.get_outputs()[0].shape[1]
        dense = kept_out in (16, 24, 5)  # every layer's dense output count
        return LayerKernels(1e-3, "Conv" if dense else "FusedConv", BLOCKED if dense else PLAIN, 1e-9 if dense else None)

    def inside_times(self, model, example, shapes, repeats, budget_s, warmup=2):
        return 1.0, dict.fromkeys(shapes, 2e-3)

    monkeypatch.setattr(ProfiledLayerCall, "kernels", kernels)
    monkeypatch.setattr(OnnxRuntime, "inside_times", inside_times)
    table = LatencyTable.build(model, x, shapes, channel_grid={"conv2": ((8, 16), (12, 24))}, time_limit_s=30.0,
                               runtime=OnnxRuntime(threads=1))
    assert table.layers["conv2"].times.tolist() == [[1e-3, 2e-3], [1e-3, 2e-3]]
    assert table.layers["conv2"].layout.tolist() == [[PLAIN, BLOCKED], [PLAIN, BLOCKED]] and table.reorder_s == 1e-9
    assert table.links == {"conv1": (), "conv2": (("conv1", 12, 12),), "head": (("conv2", 1, 1),)}


def test_onnxruntime_op_times_split_the_profile_by_node_type():
    """What the bench's --profile prints: the exported model's time per node type, convolutions included."""
    model, x = _net(), torch.randn(2, 3, 12, 12)
    ops = OnnxRuntime(threads=1).op_times(model, x, runs=3, warmup=1)
    assert {"Conv", "FusedConv"} & set(ops) and "Gemm" in ops
    assert all(t >= 0 for t in ops.values()) and sum(ops.values()) > 0


class ResidualNet(nn.Module):
    """A stem, then a block whose second convolution's output is added to the block's input before the ReLU."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.head(x.mean((2, 3)))


def test_graph_links_read_the_exported_graph():
    """ReLUs after BatchNorm, and a residual addition before one: what ONNX Runtime fuses into a convolution; and
    which layer each layer reads from, through ReLUs, pooling and the addition (counted as its layer's output), at
    the size the tensor has where it arrives."""
    model, x = _net(), torch.randn(1, 3, 8, 8)
    links = graph_links(model, x, layer_shapes(model, x))
    assert (links.activations, links.residuals) == ({"conv1", "conv2"}, set())
    assert links.inputs == {"conv1": (), "conv2": (("conv1", 8, 8),), "head": (("conv2", 1, 1),)}
    torch.manual_seed(0)
    model = ResidualNet().eval()
    links = graph_links(model, x, layer_shapes(model, x))
    assert (links.activations, links.residuals) == ({"stem", "conv1", "conv2"}, {"conv2"})
    # conv2 reads conv1, and adds the stem's output; the head reads the sum, which is conv2's
    assert links.inputs == {"stem": (), "conv1": (("stem", 8, 8),), "conv2": (("conv1", 8, 8), ("stem", 8, 8)),
                            "head": (("conv2", 1, 1),)}


def test_a_residual_layer_is_timed_with_its_addition_and_activation():
    """The single-layer graph of a residual convolution adds its second input before the ReLU (the values prove it)."""
    from rdprune.core.runtimes import layer_graph

    shape = layer_shapes(ResidualNet().eval(), torch.zeros(1, 3, 8, 8))["conv2"]
    runtime = OnnxRuntime(threads=1)
    session = runtime.session(layer_graph(shape, 16, 12, 1, True, np.random.default_rng(0), residual=True))
    assert [i.name for i in session.get_inputs()] == ["x", "r"]
    x = np.zeros((2, 16, 8, 8), np.float32)
    r = np.random.default_rng(1).standard_normal((2, 12, 8, 8), dtype=np.float32)
    bias = np.random.default_rng(0)  # the graph's bias follows its weight in the generator: recompute both
    bias.standard_normal((12, 16, 3, 3), dtype=np.float32)
    expected = np.maximum(r + bias.standard_normal(12, dtype=np.float32)[None, :, None, None], 0)
    assert np.allclose(session.run(None, {"x": x, "r": r})[0], expected, atol=1e-6)
    calls = runtime.layer_calls(shape, 2, 16, [8, 16], 1, True, residual=True)
    assert len(calls) == 2 and calls[1]()[0].shape == (2, 16, 8, 8)


def test_torch_table_records_its_runtime():
    model, x = _net(), torch.randn(1, 3, 8, 8)
    table = LatencyTable.build(model, x, layer_shapes(model, x), points=2, threads=1, time_limit_s=5.0)
    assert table.meta["runtime"] == "torch" and table.meta["optimization"] is None and table.meta["threads"] == 1


def test_table_key_every_field_must_match():
    ort = OnnxRuntime(threads=1, optimization="all")
    meta = {**ort.key(), "batch": 8}
    assert table_key_problem(meta, ort, 8) is None
    assert "batch 8 (this run: 1)" in table_key_problem(meta, ort, 1)
    assert "threads 1 (this run: 2)" in table_key_problem(meta, OnnxRuntime(threads=2), 8)
    assert "optimization 'all' (this run: 'basic')" in table_key_problem(meta, OnnxRuntime(1, optimization="basic"), 8)
    assert "runtime 'onnxruntime' (this run: 'torch')" in table_key_problem(meta, TorchRuntime(1), 8)
    # a table written before runtimes existed was measured in torch, and is reused by a torch run only
    old = {"device": "cpu", "threads": 1, "batch": 8, "measured_dense": 0.1}
    assert table_key_problem(old, TorchRuntime(1), 8) is None
    assert "runtime 'torch' (this run: 'onnxruntime')" in table_key_problem(old, ort, 8)


def test_runtimes_measure_models_and_files(tmp_path):
    from rdprune.granularity.channel.export import save_exported

    model, x = _net(), torch.randn(2, 3, 8, 8)
    paths = save_exported(model, x[:1], tmp_path)
    for runtime in (TorchRuntime(1), OnnxRuntime(1)):
        file_call = runtime.file_call(paths[runtime.file_format], x)
        assert all(t > 0 for t in runtime.medians([runtime.model_call(model, x), file_call], repeats=3, warmup=1))
        out = file_call()
        out = out[0] if isinstance(out, list) else out.detach().numpy()
        with torch.no_grad():
            np.testing.assert_allclose(out, model(x).numpy(), atol=1e-4)


# --------------------------------------------------------------------------------------------- deploy marking


def test_deploy_marks_only_formats_not_slower_at_every_batch():
    timings = {"onnx": {1: (1.0, 0.5), 8: (8.0, 4.0)},  # faster at both
               "torch_export": {1: (1.0, 1.25), 8: (8.0, 4.0)}}  # slower at batch 1
    marking = mark_deploy(timings, {"onnx": "onnxruntime", "torch_export": "torch"})
    assert marking["deploy"] == ["onnx"]
    assert marking["formats"]["torch_export"]["slower_at"] == [1] and not marking["formats"]["torch_export"]["deploy"]
    assert marking["slower"] == ["torch_export (torch) at batch 1: 0.80x"]
    assert marking["formats"]["onnx"]["batches"]["8"]["speedup"] == pytest.approx(2.0)
    assert summary_line(marking) == "deploy: onnx; slower than dense: torch_export (torch) at batch 1: 0.80x"
    equal = mark_deploy({"onnx": {1: (1.0, 1.0)}})  # not slower: deployed
    assert equal["deploy"] == ["onnx"] and summary_line(equal) == "deploy: onnx"
    both = mark_deploy({"onnx": {1: (1.0, 1.1), 4: (1.0, 1.2)}})
    assert both["deploy"] == [] and both["formats"]["onnx"]["slower_at"] == [1, 4]


def test_export_smaller_marks_deploy_from_injected_timings(monkeypatch, tmp_path):
    """The stage's final measurement, with timings injected where the runtimes would measure."""
    from rdprune.granularity.channel import stage as stage_module

    def fake_time_formats(dense, paths, example, batches, runtimes, repeats):
        assert set(paths) == {"torch_export", "onnx"} and batches == [1, 4]
        assert runtimes["onnx"].name == "onnxruntime" and runtimes["torch_export"].name == "torch"
        return {"torch_export": {1: (2.0, 2.2), 4: (8.0, 6.0)}, "onnx": {1: (1.0, 0.6), 4: (4.0, 2.0)}}

    monkeypatch.setattr(stage_module, "time_formats", fake_time_formats)
    model = _net()
    space = ChannelSpace(model, torch.zeros(1, 3, 8, 8))
    stage = stage_module.ChannelStage.__new__(stage_module.ChannelStage)
    stage.space, stage.latency_example = space, torch.randn(4, 3, 8, 8)
    stage.runtime = OnnxRuntime(threads=1)
    stage.cfg = type("Cfg", (), {"latency": type("Lat", (), {"repeats": 3})()})()
    speed = stage.export_smaller(model, tmp_path)
    assert speed["deploy"] == ["onnx"] and speed["slower"] == ["torch_export (torch) at batch 1: 0.91x"]
    assert speed["speedup"] == pytest.approx(2.0)  # the run's runtime (ONNX Runtime) at the budget's batch
    assert speed["latency_runtime"] == "onnxruntime" and speed["latency_batch"] == 4 and speed["latency_threads"] == 1
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.pt2").is_file()


# ------------------------------------------------------------------------------------------------ round_to


def _synthetic_curves(space: ChannelSpace, plans) -> dict[str, Curve]:
    rng = np.random.default_rng(3)
    curves = {}
    for g, plan in plans.items():
        d = np.cumsum(rng.uniform(0.0, 1.0, len(plan.counts))) * rng.uniform(0.5, 2.0)
        curves[g] = Curve(np.asarray(plan.amounts), d - d[0])
    return curves


@pytest.mark.parametrize("budget,keep", [("weights", 0.5), ("flops", 0.4), ("weights", 0.3)])
def test_round_to_allocation_matches_brute_force(budget, keep):
    model = _net()
    x = torch.zeros(1, 3, 8, 8)
    space = ChannelSpace(model, x)
    flops = {n: s.in_channels * s.out_channels * s.kernel_size[0] * s.kernel_size[1] * s.out_hw[0] * s.out_hw[1]
             for n, s in layer_shapes(model, x).items()}
    cost = ChannelCost(space, budget, flops=flops)
    plans = {g: group_plan(space, g, 101, "relative", round_to=4) for g in space.groups}
    for g, plan in plans.items():  # the level grid is exactly the group's multiples of 4 (what is kept)
        size = space.groups[g].size
        assert sorted(size - np.asarray(plan.counts)) == list(range(4, size + 1, 4))
    curves = _synthetic_curves(space, plans)
    limit = keep * cost.dense
    alloc = allocate_channels(curves, plans, cost, limit)
    assert all((space.groups[g].size - n) % 4 == 0 for g, n in alloc.choice.items())
    best = min((sum(float(np.maximum.accumulate(curves[g].distortion)[k]) for g, k in zip(plans, levels)), levels)
               for levels in itertools.product(*(range(len(p.counts)) for p in plans.values()))
               if cost({g: plans[g].counts[k] for g, k in zip(plans, levels)}) <= limit)
    assert alloc.cost <= limit
    assert alloc.distortion == pytest.approx(best[0], abs=1e-12)


def test_round_to_keeps_the_current_count_and_refuses_a_larger_round_to():
    model = _net()
    space = ChannelSpace(model, torch.zeros(1, 3, 8, 8))
    plan = group_plan(space, "conv2", 101, "relative", round_to=16)  # 24 channels: keeps 24 (now) or 16
    assert plan.counts == [0, 8]
    check_round_to(space, 16)
    with pytest.raises(UserError, match="prune.round_to 32 is larger than channel group conv1 .16 channels. and 1 more"):
        check_round_to(space, 32)


# ----------------------------------------------------------------------------------------------- bad input


def test_unavailable_runtime_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when it is not installed
    with pytest.raises(UserError, match="needs the onnxruntime package"):
        make_runtime("onnxruntime", 1)


def test_a_layer_the_runtime_cannot_run_is_one_line(monkeypatch):
    def broken(self, shape, *args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Conv\nmore")

    monkeypatch.setattr(OnnxRuntime, "layer_calls", broken)
    model, x = _net(), torch.zeros(1, 3, 8, 8)
    with pytest.raises(UserError) as err:
        OnnxRuntime(1).check_model(model, x, layer_shapes(model, x))
    assert str(err.value).startswith("latency.runtime onnxruntime cannot run layer conv1 (conv2d): [ONNXRuntimeError]")
    assert "\n" not in str(err.value)


CONFIG = ROOT / "configs" / "quickstart_channels.yaml"
MODEL = "model.name=dist_scripts.user_models:batchnorm_cnn"
UNTRAINED = "model.checkpoint=null"  # the config names the shipped checkpoint of another model


def test_config_refusals_are_one_line(capsys, tmp_path):
    out = f"run.out_dir={tmp_path / 'r'}"
    q = str(CONFIG)
    err = user_error(capsys, [q, MODEL, UNTRAINED, "prune.round_to=4", "prune.method=unif", out])
    assert "prune.round_to 4 applies to prune.granularity 'channel' with method rd" in err
    assert "latency.device must be null or 'cpu' under runtime onnxruntime" in user_error(
        capsys, [q, MODEL, UNTRAINED, "latency.runtime=onnxruntime", "latency.device=cuda", out])
    assert "latency.runtime must be one of 'torch', 'onnxruntime'" in user_error(capsys, [q, MODEL, UNTRAINED, "latency.runtime=tvm", out])
    err = user_error(capsys, [q, MODEL, UNTRAINED, "prune.round_to=4096", "pretrain.steps=0", out])
    assert "prune.round_to 4096 is larger than channel group" in err


def test_old_resume_key_without_the_new_settings_still_resumes():
    from rdprune.config import load_config
    from rdprune.pipeline.loop import resume_key, same_run

    cfg = load_config(CONFIG, [MODEL, UNTRAINED])
    stored = resume_key(cfg)
    del stored["latency"]["runtime"], stored["latency"]["optimization"], stored["prune"]["round_to"]
    assert same_run(stored, cfg)
    other = load_config(CONFIG, [MODEL, UNTRAINED, "latency.runtime=onnxruntime"])
    assert not same_run(stored, other)


def test_a_latency_run_made_before_latency_grid_resumes_only_on_its_even_grid():
    """Tables on the counts the levels give are the new default; a latency run directory made before keeps the
    even grid it was timed on (the resume key asks for latency.grid=even), a FLOPs run is not concerned."""
    from rdprune.config import load_config
    from rdprune.pipeline.loop import resume_key, run_differences

    cfg = load_config(CONFIG, [MODEL, UNTRAINED])
    assert cfg.prune.budget == "latency" and cfg.latency.grid == "levels"
    stored = resume_key(cfg)
    del stored["latency"]["grid"]
    assert run_differences(stored, cfg) == ["latency.grid=even"]
    assert not run_differences(stored, load_config(CONFIG, [MODEL, UNTRAINED, "latency.grid=even"]))
    flops = load_config(CONFIG, [MODEL, UNTRAINED, "prune.budget=flops"])
    assert "grid" not in resume_key(flops)["latency"]


# --------------------------------------------------------------------------------------------- whole run


def test_run_in_onnxruntime_times_the_onnx_file_and_says_where(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rdprune.run", str(CONFIG), f"run.out_dir={out}", MODEL, UNTRAINED, "pretrain.steps=10",
           "finetune.steps=2", "prune.levels=5", "prune.target_sparsity=0.15", "prune.amount_per_iteration=1",
           "calibration.size=32", "calibration.batch_size=32", "calibration.bn_images=64", "latency.batch_size=64",
           "latency.time_limit_s=20", "latency.repeats=3", "latency.points=3", "latency.runtime=onnxruntime",
           "run.progress=false", "run.threads=1"]
    run_ok(cmd)
    table = json.loads((out / "latency_table.json").read_text())
    assert table["meta"]["runtime"] == "onnxruntime" and table["meta"]["optimization"] == "all"
    conv = table["layers"]["features.4"]  # latency.grid levels: timed at the 5 levels' counts, not latency.points 3
    assert len(conv["kept_in"]) == len(conv["kept_out"]) == 5 and conv["kept_out"][-1] == 16
    row = read_rows(out)[-1]
    assert row["latency_runtime"] == "onnxruntime" and row["latency_batch"] == 64 and row["latency_threads"] == 1
    assert row["latency_device"] == "cpu"
    speed = json.loads((out / "final" / "smaller" / "latency.json").read_text())
    assert speed["latency_runtime"] == "onnxruntime" and set(speed["formats"]) == {"torch_export", "onnx"}
    assert set(speed["formats"]["onnx"]["batches"]) == {"1", "64"}
    assert set(speed["deploy"]) == {f for f, v in speed["formats"].items() if v["deploy"]}
