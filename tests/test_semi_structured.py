"""2:4 granularity: masks, candidates, exact curves, the allocation against brute force, the pipeline, the bench smoke."""
import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rdprune.core.curves import synthetic_inputs
from rdprune.core.distortion import Distortion
from rdprune.core.grid import Curve
from rdprune.distributed import DistInfo
from rdprune.granularity.two_four.stage import sharded_two_four_curves
from rdprune.granularity.two_four.units import (
    TwoFourCost,
    allocate_two_four,
    apply_two_four,
    candidates,
    current_two_four,
    estimate_two_four_curves,
    glob_two_four,
    is_two_four,
    latency_cost,
    layer_cost,
    plain_two_four_curves,
    removed_energy,
    two_four_mask,
    weight_cost,
)

from cli_errors import user_error
from launch import clean_env, read_rows, run_ok

timm = pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
VIT = "model.name=dist_scripts.vit_models:tiny_vit"
RUN = [VIT, "prune.granularity=semi_structured", "prune.budget=layers", "prune.target_sparsity=0.5",
       "prune.amount_per_iteration=0.3", "pretrain.steps=40", "pretrain.lr=0.002", "pretrain.optimizer=adamw",
       "finetune.steps=6", "finetune.optimizer=adamw", "finetune.lr=0.0005", "calibration.size=32", "calibration.batch_size=32",
       "run.progress=false", "run.threads=1"]
SCHEDULE = [0.3, 0.5]  # 1 - 0.7^t, the last clipped to the target


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=28, patch_size=7, in_chans=1,
                             embed_dim=64, depth=2, num_heads=4).eval()


# ---------------------------------------------------------------------------------------------- masks


def test_mask_keeps_the_two_largest_of_every_four_along_the_input():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    mask = two_four_mask(w)
    assert mask.shape == w.shape and mask.dtype == torch.bool and is_two_four(mask)
    groups, kept = w.abs().reshape(32, 16, 4), mask.reshape(32, 16, 4)
    assert (kept.sum(-1) == 2).all()
    assert (groups[kept].reshape(32, 16, 2).min(-1).values >= groups[~kept].reshape(32, 16, 2).max(-1).values).all()
    assert is_two_four(w * mask) and not is_two_four(w)


def test_mask_ties_go_to_the_earlier_position_and_validator_rejects_three_of_four():
    assert two_four_mask(torch.ones(1, 8)).tolist() == [[True, True, False, False] * 2]
    assert two_four_mask(torch.tensor([[0.0, -3.0, 3.0, 1.0]])).tolist() == [[False, True, True, False]]
    three = torch.tensor([[True, True, True, False, True, False, False, False]])
    assert not is_two_four(three) and not is_two_four(three.float())
    assert is_two_four(torch.tensor([[True, False, True, False, False, False, False, False]]))
    assert not is_two_four(torch.ones(2, 6, dtype=torch.bool))  # not groups of 4
    with pytest.raises(ValueError, match="multiple of 4"):
        two_four_mask(torch.ones(3, 6))


# ---------------------------------------------------------------------------------------------- candidates


def test_candidates_of_a_vit_and_the_layers_left_out_with_reasons():
    model = tiny_vit()
    layers, left_out = candidates(model)
    assert list(layers) == [f"blocks.{b}.{n}" for b in (0, 1) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    reasons = dict(left_out)
    assert set(reasons) == {"patch_embed.proj", "head"}
    assert "nn.Linear" in reasons["patch_embed.proj"] and "10x64" in reasons["head"]
    layers, left_out = candidates(model, skip=["blocks.1.mlp.fc2"])
    assert "blocks.1.mlp.fc2" not in layers and "blocks.1.mlp.fc2" not in dict(left_out)


def test_multihead_attention_and_odd_shapes_are_left_out_not_errors():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
            self.fc = nn.Linear(64, 96)
            self.odd = nn.Linear(96, 32)  # in_features 96 is no multiple of 64

        def forward(self, x):
            return self.odd(self.fc(self.attn(x, x, x)[0]))

    layers, left_out = candidates(Net())
    assert list(layers) == ["fc"]
    assert dict(left_out).keys() == {"attn.out_proj", "odd"}
    assert "MultiheadAttention" in dict(left_out)["attn.out_proj"]


# ---------------------------------------------------------------------------------------------- curves


@pytest.mark.parametrize("worst_case", [False, True], ids=["mse", "worst_case"])
def test_curves_equal_the_plain_loop_and_a_two_four_layer_has_nothing_left_to_lose(worst_case, one_thread, tmp_path):
    model = tiny_vit()
    layers, _ = candidates(model)
    apply_two_four(layers, ["blocks.0.mlp.fc1"])  # as after an earlier iteration
    x = synthetic_inputs(24, (1, 28, 28))
    fast = estimate_two_four_curves(model, layers, x, worst_case=worst_case, batch_size=10, progress=False,
                                           cache_dir=tmp_path)
    plain = plain_two_four_curves(model, layers, x, worst_case=worst_case, batch_size=10)
    assert list(fast) == list(layers)
    for name in layers:
        np.testing.assert_array_equal(fast[name].amounts, [0.0, 0.5])
        assert fast[name].distortion[0] == 0
        np.testing.assert_allclose(fast[name].distortion, plain[name].distortion, rtol=1e-6, atol=0)
    assert fast["blocks.0.mlp.fc1"].distortion[1] == 0 and all(fast[n].distortion[1] > 0 for n in layers if n != "blocks.0.mlp.fc1")
    # cached: a second call reuses every unit, and the model is left as it was
    before = {n: m.weight.clone() for n, m in layers.items()}
    again = estimate_two_four_curves(model, layers, x, worst_case=worst_case, batch_size=10, progress=False,
                                            cache_dir=tmp_path)
    assert all(np.array_equal(again[n].distortion, fast[n].distortion) for n in layers)
    assert all(torch.equal(before[n], m.weight) for n, m in layers.items())
    assert len(list(tmp_path.glob("*.curve.pt"))) == len(layers)


def test_sharded_curves_in_one_process_equal_the_core(one_thread):
    model = tiny_vit()
    layers, _ = candidates(model)
    x = synthetic_inputs(8, (1, 28, 28))
    flops = {n: 1 for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    sharded = sharded_two_four_curves(model, layers, x, distortion=Distortion(), batch_size=8, flops=flops, cache_dir=None,
                                             dist=DistInfo(), progress=False)
    core = estimate_two_four_curves(model, layers, x, batch_size=8, progress=False)
    assert list(sharded) == list(core)
    assert all(np.array_equal(sharded[n].distortion, core[n].distortion) for n in core)


# ---------------------------------------------------------------------------------------------- allocation


def _brute_force(curves: dict, cost: TwoFourCost, target: float, current: set) -> tuple[float, int]:
    """(least summed distortion, the most cost among the choices reaching it) over every subset meeting the budget."""
    names, limit, best = list(curves), cost.limit(target), (np.inf, -1)
    for choice in itertools.product((0, 1), repeat=len(names)):
        chosen = {n for n, c in zip(names, choice) if c}
        if not current <= chosen or cost(chosen) - cost.fixed > limit:
            continue
        value = sum(float(curves[n].distortion[1]) for n in chosen)
        if value < best[0] - 1e-15 or (abs(value - best[0]) <= 1e-15 and cost(chosen) > best[1]):
            best = (value, cost(chosen))
    return best


@pytest.mark.parametrize("budget", ["weights", "layers"])
@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_brute_force_optimum(budget, seed):
    rng = np.random.default_rng(seed)
    names = [f"fc{i}" for i in range(7)]
    curves = {n: Curve(np.array([0.0, 0.5]), np.array([0.0, rng.exponential()])) for n in names}
    current = {names[seed % 7]} if seed % 2 else set()
    if budget == "weights":
        sizes = {n: int(2 * rng.integers(1, 40)) * 2048 for n in names}
        cost = TwoFourCost("weights", sizes, {n: s // 2 for n, s in sizes.items()}, sum(sizes.values()) + 12345, 12345)
    else:
        cost = layer_cost(names)
    for target in (0.0, 0.1, 0.25, 0.4, cost.reachable):
        alloc = allocate_two_four(curves, cost, target, current)
        best = _brute_force(curves, cost, target, current)
        assert alloc.distortion == pytest.approx(best[0], rel=1e-12, abs=1e-15) and alloc.cost == best[1]
        assert current <= set(alloc.choice) and alloc.cost <= (1 - target) * cost.total + 1e-6
        assert alloc.cost == cost(alloc.choice)


def test_costs_and_limits_of_the_weights_and_layers_budgets():
    layers = {"a": nn.Linear(64, 32), "b": nn.Linear(128, 64)}
    cost = weight_cost(layers, total_weights=2048 + 8192 + 1000)
    assert cost.dense == {"a": 2048, "b": 8192} and cost.sparse == {"a": 1024, "b": 4096} and cost.fixed == 1000
    assert cost.reachable == pytest.approx(5120 / 11240)
    assert cost.limit(0.2) == int(0.8 * 11240) - 1000
    with pytest.raises(ValueError, match="budget cannot be met"):
        glob_two_four(layers, cost, 0.5)
    layers_cost = layer_cost(["a", "b", "c", "d", "e"])
    assert layers_cost.limit(0.5) == 2  # at least half of the five candidates go 2:4: three


def test_glob_takes_the_least_damaged_layers_first_until_the_budget_holds():
    torch.manual_seed(0)
    layers = {n: nn.Linear(64, 32) for n in ("spiky", "flat", "mixed")}
    with torch.no_grad():
        layers["flat"].weight.fill_(1.0)  # 2:4 removes half the energy
        layers["spiky"].weight.zero_()[:, ::4] = 1.0  # 2:4 removes nothing
        layers["mixed"].weight.copy_(torch.tensor([1.0, 1.0, 0.5, 0.0]).repeat(32, 16))
    assert removed_energy(layers["spiky"]) == 0 and removed_energy(layers["flat"]) == pytest.approx(0.5)
    assert removed_energy(layers["mixed"]) == pytest.approx(0.25 / 2.25)
    cost = layer_cost(layers)
    assert glob_two_four(layers, cost, 0.3).choice == ["spiky"]
    assert glob_two_four(layers, cost, 0.6).choice == ["spiky", "mixed"]
    assert glob_two_four(layers, cost, 0.6, current=["flat"]).choice == ["spiky", "flat"]


# ---------------------------------------------------------------------------------------------- pipeline


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rdprune.run", str(QUICKSTART), f"run.out_dir={out}", *RUN, *extra]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_ok(_command(out, *extra))



@pytest.fixture(scope="module")
def two_four_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_four") / "run"
    _run(out)
    return out


def _final_layers(out: Path) -> dict[str, nn.Module]:
    sys.path.insert(0, str(ROOT / "tests"))
    from dist_scripts.vit_models import tiny_vit as build

    model = build(10)
    model.load_state_dict(torch.load(out / "final" / "model.pt", weights_only=True))
    return candidates(model)[0]


def test_run_reaches_each_target_and_keeps_two_four_through_fine_tuning(two_four_run):
    rows = read_rows(two_four_run)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r, target in zip(rows[1:], SCHEDULE):
        assert r["target_sparsity"] == pytest.approx(target) and r["candidates"] == 8
        assert r["layers_2to4"] == int(np.ceil(target * 8 - 1e-9))  # the fewest layers that reach the target
        assert r["distortion_predicted"] > 0 and r["distortion_measured"] > 0
    first = json.loads((two_four_run / "allocation" / "iter_01.json").read_text())["amounts"]
    two_four_first = {n for n, a in first.items() if a >= 0.5}
    layers = _final_layers(two_four_run)
    final = current_two_four(layers)
    assert len(final) == rows[-1]["layers_2to4"] and two_four_first <= set(final)  # zeros stayed zero through fine-tuning
    for name in final:  # fine-tuned: the surviving weights moved, exactly half of each layer is zero
        assert is_two_four(layers[name].weight) and int((layers[name].weight == 0).sum()) == layers[name].weight.numel() // 2
    report = json.loads((two_four_run / "final" / "semi_structured.json").read_text())
    assert report["layers_2to4"] == final and report["candidates"] == list(layers)
    assert {e["layer"] for e in report["left_out"]} == {"patch_embed.proj", "head"}
    if not torch.cuda.is_available():
        assert report["export"]["run"] is False and "CUDA" in report["export"]["reason"]
    curves = np.load(two_four_run / "curves" / "iter_02" / "curves.npz")
    assert sorted(k.rsplit("/", 1)[0] for k in curves.files if k.endswith("/amounts")) == sorted(layers)


def test_glob_under_a_weights_budget(tmp_path):
    out = tmp_path / "run"
    _run(out, "prune.method=glob", "prune.budget=weights", "prune.target_sparsity=0.3", "prune.amount_per_iteration=1.0")
    row = read_rows(out)[-1]
    assert 0.3 <= row["sparsity"] and row["cost_remaining"] <= 0.7 and 0 < row["layers_2to4"] <= 8


@pytest.mark.slow
def test_resume_after_kill_between_iterations_matches_uninterrupted(two_four_run, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(out), cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 300
    while not (results.exists() and len(results.read_text().splitlines()) >= 2) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_rows(out)) in (2, 3)
    assert "resuming" in _run(out).stderr
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_rows(out)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in read_rows(two_four_run)]


def test_latency_budget_path_with_the_gpu_timings_faked(monkeypatch, tmp_path, one_thread, capsys):
    """Everything of a latency budget but the CUDA timings: the table (saved, reused on resume), slow layers
    left out, the allocation on measured microseconds, the rows; the export is then not run on this CPU."""
    from rdprune.cli.run import main
    from rdprune.granularity.two_four import stage

    timed = []

    def fake_layers(layers, shapes, **_):
        timed.append(shapes)
        return {n: 100 for n in layers}, {n: 60 if ".mlp." in n else 100 for n in layers}  # 2:4 pays off in the MLPs only

    monkeypatch.setattr(stage, "latency_device", lambda cfg, dist: torch.device("cpu"))
    monkeypatch.setattr(stage, "layer_latency_us", fake_layers)
    monkeypatch.setattr(stage, "model_latency_s", lambda models, example, repeats: [1e-3] * len(models))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(stage, "kernels_missing", lambda device: "the export is not part of this test")  # also on a GPU machine
    out = tmp_path / "run"
    argv = [str(QUICKSTART), f"run.out_dir={out}", *RUN, "prune.budget=latency", "prune.target_sparsity=0.1",
            "prune.amount_per_iteration=1.0", "latency.batch_size=3"]
    assert main(argv) == 0
    assert timed[0]["blocks.0.mlp.fc1"] == (3, 17, 64)  # the real input shape at latency.batch_size: 16 patches + class token
    table = json.loads((out / "latency_table.json").read_text())
    assert table["model_us"] == 1000 and table["device"] == "Fake GPU" and table["batch_size"] == 3
    row = read_rows(out)[-1]
    # 1000 us dense, 600 outside the four MLP layers, each 40 us faster 2:4: 10 % off needs three of them
    assert row["candidates"] == 4 and row["layers_2to4"] == 3 and row["latency_predicted_ms"] == pytest.approx(0.88)
    report = json.loads((out / "final" / "semi_structured.json").read_text())
    assert all(".mlp." in n for n in report["layers_2to4"])
    assert {e["layer"] for e in report["left_out"] if "not faster" in e["reason"]} == {f"blocks.{b}.attn.{n}" for b in (0, 1)
                                                                                       for n in ("qkv", "proj")}
    assert report["export"]["run"] is False
    assert main(argv) == 0 and len(timed) == 1  # the rerun reuses the saved table
    # A table measured at another batch size is not reused silently
    capsys.readouterr()
    assert "at latency.batch_size 5 on Fake GPU; delete it" in user_error(capsys, argv[:-1] + ["latency.batch_size=5", "run.resume=true"])


def test_a_layer_the_forward_never_calls_is_refused_until_skipped(tmp_path, capsys, one_thread):
    """Every granularity refuses a prunable layer the forward pass never calls (its distortion and cost mean
    nothing); prune.skip leaves it out, and it is then no 2:4 candidate."""
    from rdprune.cli.run import main

    argv = [str(QUICKSTART), f"run.out_dir={tmp_path / 'run'}", *RUN, "model.name=dist_scripts.vit_models:tiny_vit_with_unused_layer",
            "prune.amount_per_iteration=1.0", "pretrain.steps=2"]
    assert "layers never called in a forward pass: ['unused']; skip them" in user_error(capsys, argv)
    assert main([*argv, "prune.skip=[unused]"]) == 0
    report = json.loads((tmp_path / "run" / "final" / "semi_structured.json").read_text())
    assert "unused" not in report["candidates"] and len(report["candidates"]) == 8


def test_latency_budget_keeps_layers_already_two_four_where_it_is_not_faster(monkeypatch, tmp_path, one_thread):
    """A checkpoint whose MLP layers are 2:4 already, timed where 2:4 pays off in attention only: the MLP layers
    stay candidates (priced as no gain) and keep their masks, so fine-tuning cannot make them dense again."""
    from rdprune.cli.run import main
    from rdprune.granularity.two_four import stage

    def fake_layers(layers, shapes, **_):
        return {n: 100 for n in layers}, {n: 60 if ".attn." in n else 100 for n in layers}

    monkeypatch.setattr(stage, "latency_device", lambda cfg, dist: torch.device("cpu"))
    monkeypatch.setattr(stage, "layer_latency_us", fake_layers)
    monkeypatch.setattr(stage, "model_latency_s", lambda models, example, repeats: [1e-3] * len(models))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    first = tmp_path / "mlp"
    assert main([str(QUICKSTART), f"run.out_dir={first}", *RUN, "prune.method=glob", "prune.target_sparsity=0.5",
                 "prune.amount_per_iteration=1.0", "prune.skip=[blocks.0.attn.qkv,blocks.0.attn.proj,blocks.1.attn.qkv,"
                 "blocks.1.attn.proj]"]) == 0
    start = torch.load(first / "final" / "model.pt", weights_only=True)
    already = {n.removesuffix(".weight") for n, w in start.items() if ".mlp." in n and n.endswith(".weight") and is_two_four(w)}
    assert already
    out = tmp_path / "run"
    assert main([str(QUICKSTART), f"run.out_dir={out}", *RUN, f"model.checkpoint={first / 'final' / 'model.pt'}",
                 "prune.budget=latency", "prune.target_sparsity=0.05", "prune.amount_per_iteration=1.0",
                 "latency.batch_size=3", "finetune.steps=10", "finetune.lr=0.01"]) == 0
    report = json.loads((out / "final" / "semi_structured.json").read_text())
    assert already <= set(report["candidates"]) and already <= set(report["layers_2to4"])
    final = torch.load(out / "final" / "model.pt", weights_only=True)
    assert all(is_two_four(final[f"{n}.weight"]) for n in already)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_latency_budget_without_two_four_kernels_is_one_line(capsys, tmp_path):
    line = user_error(capsys, [str(QUICKSTART), f"run.out_dir={tmp_path / 'run'}", *RUN, "prune.budget=latency"])
    assert "2:4 kernels" in line and "compute capability 8.0" in line and "weights or layers" in line
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_no_candidate_is_one_line(capsys, tmp_path):
    line = user_error(capsys, [str(QUICKSTART), f"run.out_dir={tmp_path / 'run'}", "model.name=dist_scripts.user_models:batchnorm_cnn",
                               "prune.granularity=semi_structured", "prune.target_sparsity=0.5", "run.progress=false"])
    assert "can go 2:4" in line and "batchnorm_cnn" in line


def test_bench_smoke_on_cpu(capsys):
    from rdprune.bench.semi_structured import main

    assert main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "sm80" in out and "smoke" in out and "masks valid 2:4: True" in out


def test_the_final_table_shows_the_two_four_layers_and_predicted_latency():
    from rdprune.pipeline.report import results_table

    base = {"method": "rd", "sparsity": 0.0, "flops_remaining": 1.0, "top1_pruned": 97.0, "top1": 97.0, "loss": 0.2, "seconds": 1.0}
    rows = [{**base, "iteration": 0}, {**base, "iteration": 1, "layers_2to4": 8, "candidates": 16, "latency_predicted_ms": 0.88}]
    header, _, dense, pruned = results_table(rows).splitlines()
    assert header.split()[-2:] == ["layers", "predicted"] and "2:4 layers" in header
    assert pruned.endswith("  8 of  16     0.880 ms") and dense.rstrip().endswith("1.0s")
    assert len(header) == len(pruned) == len(dense)  # the columns line up


def test_the_public_api_as_the_package_docstring_shows_it():
    import rdprune

    torch.manual_seed(0)
    model = rdprune.build_model("timm:vit_tiny_patch16_224", 10, input_shape=(1, 28, 28),
                                kwargs=dict(img_size=28, patch_size=7, embed_dim=64, depth=2, num_heads=4)).eval()
    layers, left_out = rdprune.two_four_candidates(model)
    curves = rdprune.estimate_two_four_curves(model, layers, rdprune.synthetic_inputs(16, (1, 28, 28)), progress=False)
    total = sum(m.weight.numel() for m in rdprune.prunable_layers(model).values())
    chosen = rdprune.allocate_two_four(curves, rdprune.two_four_weight_cost(layers, total), 0.25).choice
    masks = rdprune.apply_two_four(layers, chosen)
    assert len(layers) == 8 and [n for n, _ in left_out] == ["patch_embed.proj", "head"]
    assert set(masks) == set(chosen) and all(is_two_four(layers[n].weight) for n in chosen)
    removed = sum(int((~m).sum()) for m in masks.values())
    assert removed >= 0.25 * total  # the budget: a quarter of all prunable weights


def test_layers_timed_alone_that_outlast_the_whole_model_bound_the_latency_cost():
    """Timed one by one, two layers may add up to more than the model timed at once (overlapping launch
    overheads): the model then counts as their sum, and every 2:4 choice still costs a fraction in [0, 1]."""
    cost = latency_cost({"a": 600, "b": 600}, {"a": 300, "b": 400}, 1000)
    assert (cost.total, cost.fixed) == (1200, 0)
    assert cost(["a", "b"]) == 700 and 0 < cost.reachable < 1
    with pytest.raises(ValueError, match="no choice changes must be >= 0"):
        TwoFourCost("latency", {"a": 600}, {"a": 300}, 500, -100)
