"""The comparison sweep: a reduced sweep end to end, resuming without redoing finished runs, and
strict validation of the sweep section before any work starts."""
import contextlib
import csv
import io
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from rdprune.cli.common import run_cli
from rdprune.compare import main
from rdprune.sweep.plan import load_sweep
from rdprune.sweep.tables import CLEAR_BEST, CSV_COLUMNS, TIED_BEST, Stat, _marks

from launch import clean_env, torchrun_command

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "compare_quickstart.yaml"
REDUCED = [
    "pretrain.steps=40", "finetune.steps=5", "prune.levels=6", "prune.target_sparsity=0.75",
    "calibration.size=32", "run.progress=false", "run.threads=1",
    "sweep.methods=[rd, lamp]", "sweep.seeds=[0]", "sweep.variants={}",
]
LEVELS = ["0.5", "0.75"]
# torchrun's error-file hook (rdprune.distributed.record) cannot install a fault handler on
# pytest's captured stderr; harmless in process.
pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def _compare(out: Path, *extra: str) -> int:
    return main([str(CONFIG), f"run.out_dir={out}", *REDUCED, *extra])


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("compare") / "sweep"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert _compare(out) == 0
    return out, stdout.getvalue()


def test_reduced_sweep_writes_tables_and_plot(sweep):
    out, printed = sweep
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(r["level"], r["method"]) for r in rows] == [(lv, m) for lv in LEVELS for m in ("rd", "lamp")]
    for r in rows:
        assert r["seeds"] == "1" and r["top1_std"] == ""  # one seed: no spread to report
        assert 0 <= float(r["top1_mean"]) <= 100 and 0 < float(r["flops_remaining_mean"]) <= 1
        assert abs(float(r["sparsity_mean"]) - float(r["level"])) < 0.02
    for level in LEVELS:
        marks = [r["top1_mark"] for r in rows if r["level"] == level]
        assert sum(m in (CLEAR_BEST, TIED_BEST) for m in marks) == 1

    md = (out / "comparison.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert "top-1 after fine-tuning" in table[0] and "top-1 right after pruning" in table[0]
    assert [line.split("|")[2].strip() for line in table[1:]] == ["rd", "lamp", "rd", "lamp"]
    assert table[1] in printed  # the CLI prints the table at the end
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_run_starts_from_the_one_pretrained_checkpoint(sweep):
    out, _ = sweep
    checkpoint = str((out / "pretrained" / "pretrained.pt").resolve())
    dense = set()
    for name in ("rd_seed0", "lamp_seed0"):
        cfg = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
        assert cfg["model"]["checkpoint"] == checkpoint
        assert not (out / "runs" / name / "pretrained.pt").exists()  # no run pretrains on its own
        dense.add(json.loads((out / "runs" / name / "results.jsonl").read_text().splitlines()[0])["top1"])
    assert len(dense) == 1


def test_resume_redoes_only_unfinished_runs(sweep):
    out, _ = sweep
    finished = _mtimes(out / "runs" / "rd_seed0")
    pretrained = _mtimes(out / "pretrained")
    # An interruption inside lamp's first iteration: its rows, last model and final outputs are
    # missing; the tables were never written. (A last.pt ahead of the rows would be refused.)
    lamp = out / "runs" / "lamp_seed0"
    results = (lamp / "results.jsonl").read_text().splitlines()
    (lamp / "results.jsonl").write_text(results[0] + "\n")
    for p in (lamp / "checkpoints" / "last.pt", lamp / "final" / "model.pt", lamp / "final" / "masks.pt",
              out / "comparison.csv", out / "comparison.md"):
        p.unlink()

    assert _compare(out) == 0
    assert _mtimes(out / "runs" / "rd_seed0") == finished
    assert _mtimes(out / "pretrained") == pretrained
    assert len((lamp / "results.jsonl").read_text().splitlines()) == len(results)
    assert (lamp / "final" / "model.pt").exists()
    assert (out / "comparison.csv").exists() and (out / "comparison.md").exists()


def _error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("rdprune: error: ")
    return err


def _config_with(tmp_path: Path, sweep_section: dict) -> Path:
    data = yaml.safe_load(CONFIG.read_text())
    data["sweep"] = sweep_section
    data["run"]["out_dir"] = str(tmp_path / "never")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("sweep_section, expected", [
    ({"methds": ["rd"]}, "unknown key 'sweep.methds' (did you mean 'methods'?)"),
    ({"methods": ["lamb"]}, "'lamb', not a method (did you mean 'lamp'?)"),
    ({"methods": ["rd"], "seeds": [0, 0]}, "sweep.seeds lists a seed more than once"),
    ({"methods": ["rd"], "seeds": [-1]}, "sweep.seeds must be a non-empty list of integers >= 0"),
    ({"variants": {"x": {"prune.distorsion": "mse"}}}, "unknown key 'prune.distorsion' (did you mean 'prune.distortion'?)"),
    ({"variants": {"x": {"prune.distortion": "l2"}}}, "sweep.variants.x: prune.distortion must be one of 'mse', 'worst_case'"),
    ({"variants": {"x": {"model.checkpoint": "a.pt"}}}, "model.checkpoint cannot vary within a sweep"),
    ({"variants": {"x": {"run.seed": 3}}}, "run.seed cannot vary within a sweep: it is set by sweep.seeds"),
    ({"variants": {"a/b": {"prune.method": "rd"}}}, "a variant name must be"),
    ({"methods": ["rd"], "variants": {"rd_mse": {"prune.distortion": "mse"}}},
     "sweep.variants.rd_mse resolves to the same runs as sweep.methods 'rd'"),
    ({"seeds": [0]}, "the sweep lists no runs"),
])
def test_bad_sweep_sections_exit_2_before_any_work(capsys, tmp_path, sweep_section, expected):
    err = _error(capsys, str(_config_with(tmp_path, sweep_section)))
    assert expected in err
    assert not (tmp_path / "never").exists()


def test_bad_sweep_override_and_missing_section(capsys, tmp_path):
    assert "unknown key 'sweep.seed' (did you mean 'seeds'?)" in _error(capsys, str(CONFIG), "sweep.seed=[1]")
    assert "unknown key 'prune.metod'" in _error(capsys, str(CONFIG), "prune.metod=rd")
    plain = tmp_path / "plain.yaml"
    plain.write_text((ROOT / "configs" / "quickstart.yaml").read_text())
    assert "no 'sweep' section" in _error(capsys, str(plain))


def test_the_shipped_sweep_plans_every_method_and_variant():
    plan = load_sweep(CONFIG)
    assert plan.entries[:6] == ["rd", "lamp", "glob", "unif", "unifplus", "erk"]
    assert len(plan.seeds) >= 3 and plan.pretrain is not None
    assert plan.runs[0].seed == plan.runs[len(plan.entries) - 1].seed  # seeds outermost
    by_entry = {r.entry: r.cfg for r in plan.runs}
    assert by_entry["rd"].prune.target_sparsity >= 0.98
    assert by_entry["rd_worst_case"].prune.distortion == "worst_case"
    assert by_entry["rd_zero_data"].calibration.source == "synthetic"
    assert by_entry["rd_oneshot"].prune.schedule() == [by_entry["rd"].prune.target_sparsity]
    assert len({r.cfg.model.checkpoint for r in plan.runs}) == 1


def test_one_shot_targets_share_the_dense_curves_and_fill_one_table(tmp_path):
    out = tmp_path / "targets"
    extra = ["sweep.targets=[0.5, 0.75]", "prune.amount_per_iteration=1.0", "prune.grid=absolute"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert _compare(out, *extra) == 0
    plan = load_sweep(CONFIG, [f"run.out_dir={out}", *REDUCED, *extra])
    assert [(r.entry, r.target) for r in plan.runs] == [("rd", 0.5), ("rd", 0.75), ("lamp", 0.5), ("lamp", 0.75)]
    assert {r.cfg.calibration.curve_cache for r in plan.runs} == {str((out / "curve_cache").resolve())}
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "lamp_target50_seed0", "lamp_target75_seed0", "rd_target50_seed0", "rd_target75_seed0"]
    # one pass of curve estimation served both targets: each layer's curve was cached once
    assert len(list((out / "curve_cache").rglob("*.pt"))) == 5  # small_cnn's five prunable layers
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["level"], r["method"]) for r in rows] == [(lv, m) for lv in LEVELS for m in ("rd", "lamp")]
    for level, target in zip(LEVELS, ("50", "75")):
        row = json.loads((out / "runs" / f"rd_target{target}_seed0" / "results.jsonl").read_text().splitlines()[-1])
        assert f"{row['target_sparsity']:g}" == level and row["iteration"] == 1  # one shot


@pytest.mark.parametrize("targets, message", [
    ("[]", "sweep.targets must be a non-empty list of distinct sparsities in (0, 1)"),
    ("[0.5, 1.0]", "sweep.targets must be a non-empty list"),
    ("[0.5, 0.5]", "sweep.targets must be a non-empty list"),
])
def test_bad_sweep_targets(capsys, targets, message):
    assert message in _error(capsys, str(CONFIG), f"sweep.targets={targets}")


def test_marks_call_differences_within_the_seed_spread_ties():
    clear = _marks([Stat(90.0, 0.5, 3), Stat(88.0, 0.5, 3)])
    assert [m for m, _ in clear] == [CLEAR_BEST, "below best"]
    tie = _marks([Stat(90.0, 1.5, 3), Stat(89.0, 0.5, 3)])
    assert [m for m, _ in tie] == [TIED_BEST, "≈ best, within seed spread"]
    assert tie[1][1] == pytest.approx(1.0)


@pytest.mark.slow  # two torchrun launches of a reduced sweep, ~30-60 s on 2 busy cores
@pytest.mark.distributed
def test_sweep_under_torchrun_runs_every_run_on_both_ranks_and_resumes(tmp_path):
    env = clean_env()
    out = tmp_path / "sweep"
    cmd = torchrun_command(2, "-m", "rdprune.compare", str(CONFIG), f"run.out_dir={out}", *REDUCED)
    first = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("| 75.00 % | rd |") == 1  # rank 0 alone prints the table
    for name in ("rd_seed0", "lamp_seed0"):
        assert json.loads((out / "runs" / name / "provenance.json").read_text())["world_size"] == 2
    runs = _mtimes(out / "runs")
    second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _mtimes(out / "runs") == runs
    assert len(list(csv.DictReader((out / "comparison.csv").read_text().splitlines()))) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_a_two_four_latency_sweep_without_kernels_stops_before_pretraining(capsys, tmp_path):
    vit = ROOT / "configs" / "compare_vit_2to4.yaml"
    for ask in (["prune.budget=latency"], ["sweep.variants={rd_latency: {prune.budget: latency}}"]):  # base or one variant
        err = _error(capsys, str(vit), f"run.out_dir={tmp_path / 'sweep'}", *ask)
        assert "2:4 kernels" in err and "choose prune.budget weights or layers" in err
        assert not (tmp_path / "sweep").exists()


def test_two_four_runs_show_their_layer_count_in_the_tables():
    from rdprune.sweep.tables import csv_table, markdown_table, summarise

    def rows(top1: float, layers: int) -> list[dict]:
        base = {"method": "rd", "sparsity": 0.2, "flops_remaining": 0.8, "top1_pruned": top1, "top1": top1, "loss": 0.1}
        return [{**base, "iteration": 0, "target_sparsity": 0.0}, {**base, "iteration": 1, "target_sparsity": 0.5,
                                                                    "layers_2to4": layers, "candidates": 16}]
    results = {"rd": {"s0": rows(97.0, 8), "s1": rows(96.0, 8)}, "glob": {"s0": rows(95.0, 8), "s1": rows(95.5, 8)}}
    table = markdown_table(summarise(results))
    assert "| 2:4 layers | seeds |" in table.splitlines()[0] and "| 8.0 | 2 |" in table.splitlines()[2]
    assert csv_table(summarise(results)).splitlines()[1].endswith(",8")


@pytest.mark.parametrize("ask, expected", [
    (["sweep.targets=[0.5, 0.97]", "prune.min_density=0.05"],
     "sweep run 'rd' at sweep.targets 0.97: prune.target_sparsity 0.97 is out of reach: with every layer keeping its floor"),
    (["sweep.variants={dense_floor: {prune.min_density: 0.5}}"], "sweep run 'dense_floor': prune.target_sparsity 0.75 is out of"),
    (["sweep.variants={chan: {prune.granularity: channel, prune.budget: flops, prune.min_density: 0.6}}"],
     "sweep run 'chan': prune.target_sparsity 0.75 is out of reach at channel granularity"),
    (["sweep.variants={two_four: {prune.granularity: semi_structured, prune.budget: weights}}"],
     "sweep run 'two_four': prune.target_sparsity 0.75 is out of reach at granularity semi_structured"),
])
def test_a_run_that_would_be_refused_stops_the_sweep_before_pretraining(capsys, tmp_path, ask, expected):
    """Each run's model, floors and target are checked with random weights before the shared pretraining."""
    err = _error(capsys, str(CONFIG), f"run.out_dir={tmp_path / 'sweep'}", *REDUCED, *ask)
    assert expected in err, err
    assert not (tmp_path / "sweep").exists()


def test_latency_runs_are_checked_before_pretraining_without_timing(tmp_path):
    from rdprune.distributed import DistInfo
    from rdprune.errors import UserError
    from rdprune.sweep.plan import check_plan

    latency = [f"run.out_dir={tmp_path / 'sweep'}", *REDUCED, "latency.time_limit_s=10",
               "sweep.variants={lat: {prune.granularity: channel, prune.budget: latency, prune.min_density: 0.9}}"]
    plan = load_sweep(CONFIG, latency)
    check_plan(plan, DistInfo())  # its reach needs the timing: left to the run, and nothing timed or written here
    assert not (tmp_path / "sweep").exists()
    with pytest.raises(UserError) as excinfo:  # two ranks would wait at a collective while rank 0 times the layers
        check_plan(load_sweep(CONFIG, [*latency, "distributed.timeout_s=15"]), DistInfo(world_size=2))
    assert str(excinfo.value).startswith("sweep run 'lat': distributed.timeout_s 15 is too short for latency.time_limit_s 10")
    too_many = ["sweep.variants={lat: {prune.granularity: channel, prune.budget: latency, calibration.bn_images: 100000}}",
                "model.name=dist_scripts.user_models:batchnorm_cnn"]
    with pytest.raises(UserError, match="sweep run 'lat': calibration.bn_images is 100000, but the training set has"):
        check_plan(load_sweep(CONFIG, [*latency, *too_many]), DistInfo())


def test_sweep_variants_cannot_change_the_process_group(capsys):
    err = _error(capsys, str(CONFIG), *REDUCED, "sweep.variants={x: {distributed.timeout_s: 30}}")
    assert "distributed.timeout_s cannot vary within a sweep: the sweep opens its process group once" in err


def _level_rows(top1_pruned: float) -> list[dict]:
    base = {"method": "m", "sparsity": 0.5, "flops_remaining": 0.5, "loss": 0.1, "seconds": 1.0, "top1": 90.0}
    return [{**base, "iteration": 0, "target_sparsity": 0.0, "top1_pruned": 95.0},
            {**base, "iteration": 1, "target_sparsity": 0.5, "top1_pruned": top1_pruned}]


def test_entries_are_paired_with_the_best_peer_seed_by_seed():
    from rdprune.sweep.tables import csv_table, markdown_table, summarise

    results = {
        "rd": {0: _level_rows(80.0), 1: _level_rows(70.0), 2: _level_rows(75.0)},
        "close": {0: _level_rows(78.0), 1: _level_rows(66.0), 2: _level_rows(75.5)},
        "peer_a": {0: _level_rows(77.0), 1: _level_rows(67.0), 2: _level_rows(73.0)},  # the best peer: mean 72.33
        "peer_b": {0: _level_rows(60.0), 1: _level_rows(60.0), 2: _level_rows(60.0)},
    }
    rows = {r.entry: r for r in summarise(results, ["peer_a", "peer_b"])}
    assert rows["rd"].paired_peer == "peer_a" and rows["rd"].paired.mean == pytest.approx(8 / 3)
    assert rows["rd"].paired_beyond  # +3, +3, +2: same sign, mean 2.67 > std 0.58
    assert not rows["close"].paired_beyond  # +1, -1, +2.5: signs differ
    assert rows["peer_a"].paired is None and rows["peer_b"].paired is None
    table = markdown_table(list(rows.values()))
    assert "+2.67 ± 0.58 vs peer_a **beyond spread**" in table and "vs best peer, paired" in table
    assert "true" in csv_table(list(rows.values()))


def test_the_dense_spread_is_over_seeds_not_over_runs():
    from rdprune.sweep.tables import dense_top1

    def run(dense: float) -> list[dict]:
        return [{**row, "top1": dense} if row["iteration"] == 0 else row for row in _level_rows(80.0)]

    # each seed pretrained its own network: 97, 98 and 99 % dense, whatever the number of methods
    results = {m: {0: run(97.0), 1: run(98.0), 2: run(99.0)} for m in ("rd", "unif", "peer_a", "peer_b", "peer_c")}
    dense = dense_top1(results)
    assert dense.mean == pytest.approx(98.0) and dense.std == pytest.approx(1.0)  # over 15 runs it would be 0.85
    shared = dense_top1({m: {0: run(97.0), 1: run(97.0)} for m in ("rd", "unif")})  # one checkpoint for every seed
    assert shared.mean == 97.0 and shared.std == 0.0 and shared.n == 2


def test_each_seed_can_pretrain_its_own_network(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    section = "\nsweep:\n  methods: [rd, glob]\n  seeds: [0, 3]\n  pretrain_per_seed: true\n"
    sweep.write_text((ROOT / "configs" / "quickstart.yaml").read_text() + section)
    plan = load_sweep(sweep, [f"run.out_dir={tmp_path / 'out'}"])
    assert [p.run.seed for p in plan.pretrains] == [0, 3]
    by_seed = {r.seed: r.cfg.model.checkpoint for r in plan.runs}
    assert by_seed[0].endswith("pretrained_seed0/pretrained.pt") and by_seed[3].endswith("pretrained_seed3/pretrained.pt")
    with pytest.raises(ValueError, match="sweep.peers must list entries of the sweep"):
        load_sweep(sweep, ["sweep.peers=[tp_l2]"])
