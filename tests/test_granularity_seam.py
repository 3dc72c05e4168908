"""The granularity seam: the pipeline, sweeps, CLI, run layout and reports never name a granularity, and a toy
granularity registered in a few lines (``dist_scripts.halves_granularity``) runs through the pipeline, the
allocation, sharding at 2 ranks, resume and a sweep."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch import clean_env, read_rows, torchrun_command

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rdprune"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
GENERIC = ["pipeline", "sweep", "cli"]
GRANULARITY_WORDS = re.compile(r"channel|semi|two_four|2to4", re.I)
TOY = ["prune.granularity=halves", "prune.target_sparsity=0.3", "prune.amount_per_iteration=0.2", "finetune.steps=0",
       "calibration.size=64", "calibration.batch_size=32", "run.progress=false", "run.threads=1", "distributed.curve_threads=1"]


def _generic_modules() -> list[Path]:
    """pipeline/ (with the run layout and the report), sweep/, cli/ and the sharded curves."""
    return [p for d in GENERIC for p in sorted((PACKAGE / d).rglob("*.py"))] + [PACKAGE / "distributed" / "sharded_curves.py"]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _identifiers(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.update(filter(None, (node.name, node.asname)))
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_generic_layers_import_no_granularity_package_and_name_none():
    assert _generic_modules(), "the generic packages moved"
    for path in _generic_modules():
        granularity_imports = {m for m in _imports(path) if m.startswith("rdprune.granularity.")
                               and m.split(".")[2] not in ("base", "spec")}
        assert not granularity_imports, f"{path.relative_to(ROOT)} imports {sorted(granularity_imports)}"
        named = sorted(n for n in _identifiers(path) if GRANULARITY_WORDS.search(n))
        assert not named, f"{path.relative_to(ROOT)} names a granularity: {named}"


def test_config_imports_no_implementation_and_data_no_models():
    for path in sorted((PACKAGE / "config").glob("*.py")):
        allowed = ("rdprune.config", "rdprune.registry", "rdprune.errors", "rdprune.files", "rdprune.granularity.spec")
        bad = {m for m in _imports(path) if m.startswith("rdprune") and not m.startswith(allowed) and m != "rdprune"}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
    for path in sorted((PACKAGE / "data").glob("*.py")):
        assert not {m for m in _imports(path) if m.startswith("rdprune.models")}, path
    # No cycle through the training vocabulary: optim imports the config for type checking only.
    optim = (PACKAGE / "training" / "optim.py").read_text()
    assert "if TYPE_CHECKING:" in optim and optim.index("from rdprune.config") > optim.index("if TYPE_CHECKING:")


def test_core_holds_no_granularity_module():
    assert not [p.name for p in (PACKAGE / "core").glob("*.py") if GRANULARITY_WORDS.search(p.stem)]
    for path in (PACKAGE / "core").glob("*.py"):
        assert not {m for m in _imports(path) if m.startswith("rdprune.granularity")}, path


def _run(*args: str, nproc: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = torchrun_command(nproc, *args) if nproc > 1 else [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(RDPRUNE_PLUGINS="dist_scripts.halves_granularity"),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc



def _allocations(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "allocation").glob("iter_*.json"))]


@pytest.mark.slow
def test_a_toy_granularity_runs_through_pipeline_ranks_resume_and_sweep(tmp_path):
    """Registered in a few lines, the toy granularity needs nothing else: one process, 2 ranks, a resumed run and a
    sweep all run it, the allocation meets the budget, and 2 ranks choose exactly what one process chooses."""
    pre = tmp_path / "pre"
    _run("-m", "rdprune.run", str(QUICKSTART), f"run.out_dir={pre}", "pretrain.steps=30", *TOY)
    checkpoint = f"model.checkpoint={pre / 'pretrained.pt'}"
    one = tmp_path / "one"
    _run("-m", "rdprune.run", str(QUICKSTART), f"run.out_dir={one}", checkpoint, *TOY)
    rows = read_rows(one, timings=False)
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[-1]["target_sparsity"] == 0.3
    assert all(r["sparsity"] >= r["target_sparsity"] - 1e-9 and r["sparsity"] <= 0.5 for r in rows[1:])
    assert all(a in (0.0, 0.5) for alloc in _allocations(one) for a in alloc["amounts"].values())
    assert (one / "plots" / "rd_curves.png").exists() and (one / "final" / "model.pt").exists()

    two = tmp_path / "two"
    _run("-m", "rdprune.run", str(QUICKSTART), f"run.out_dir={two}", checkpoint, *TOY, nproc=2)
    assert _allocations(two) == _allocations(one)
    def key(r: dict) -> tuple:
        return r["sparsity"], r["top1_pruned"], r["top1"]

    assert [key(r) for r in read_rows(two, timings=False)] == [key(r) for r in rows]

    # Resume as a kill during iteration 1 leaves the directory: the dense row only, the rest redone alike.
    (one / "results.jsonl").write_text((one / "results.jsonl").read_text().splitlines()[0] + "\n")
    proc = _run("-m", "rdprune.run", str(QUICKSTART), f"run.out_dir={one}", checkpoint, *TOY)
    assert "resuming" in proc.stderr and read_rows(one, timings=False) == rows

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(QUICKSTART.read_text() + "\nsweep:\n  methods: [rd]\n  seeds: [0, 1]\n")
    out = tmp_path / "compare"
    _run("-m", "rdprune.compare", str(sweep), f"run.out_dir={out}", checkpoint, *TOY)
    table = (out / "comparison.md").read_text()
    assert "| 30.00 % | rd |" in table and table.count("| rd |") == 2  # both levels of the schedule, two seeds each


def test_an_unknown_granularity_names_the_registered_ones(tmp_path):
    from rdprune.config import load_config
    from rdprune.errors import UserError

    with pytest.raises(UserError, match="prune.granularity must be one of 'weight', 'channel', 'semi_structured'"):
        load_config(QUICKSTART, ["prune.granularity=halves"])
