"""Config loading, overrides, schedule, the exact one-line errors, and the CLI exit contract."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from rdprune.cli.common import parse_run_args, run_cli
from rdprune.config import (
    PruneConfig,
    config_from_dict,
    config_hash,
    config_reference,
    config_to_dict,
    config_to_yaml,
    load_config,
    save_config,
)
from rdprune.errors import UserError
from rdprune.sweep.plan import load_sweep

from launch import clean_env

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
RUN_CONFIGS = [p for p in SHIPPED if "sweep:" not in p.read_text()]  # the rest are compare sweeps

MINIMAL = """\
model:
  name: small_cnn
data:
  name: mnist5k
prune:
  target_sparsity: 0.9
"""


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def minimal(tmp_path: Path) -> Path:
    return write(tmp_path, MINIMAL)


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- shipped configs --------------------------------------------------------------------------

def test_configs_folder_has_the_published_experiments():
    names = {p.stem for p in SHIPPED}
    assert {"quickstart", "resnet32_cifar", "vgg16_cifar", "resnet50", "resnet50_oneshot",
            "resnet50_zeroshot"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_opens_with_its_command(path: Path):
    """Run configs load with load_config; sweep configs (a `sweep:` section) with the sweep loader."""
    first = path.read_text().splitlines()[0]
    if "sweep:" in path.read_text():
        cfg = load_sweep(path).base
        assert first.startswith("# ") and "rdprune.compare" in first and f"configs/{path.name}" in first
    else:
        cfg = load_config(path)
        assert first.startswith("# ") and "rdprune.run" in first and f"configs/{path.name}" in first
    schedule = cfg.prune.schedule()
    assert schedule[-1] == cfg.prune.target_sparsity
    assert schedule == sorted(schedule)


def test_shipped_settings_match_the_published_experiments():
    quick = load_config(REPO / "configs/quickstart.yaml")
    assert (quick.data.name, quick.model.name, quick.run.device) == ("mnist5k", "small_cnn", "cpu")
    assert quick.prune.target_sparsity >= 0.95 and quick.prune.method == "rd"
    assert load_config(REPO / "configs/resnet50.yaml").prune.schedule() == pytest.approx([0.2, 0.36, 0.41])
    assert load_config(REPO / "configs/resnet50_oneshot.yaml").prune.schedule() == [0.58]
    zero = load_config(REPO / "configs/resnet50_zeroshot.yaml")
    assert zero.calibration.source == "synthetic" and zero.prune.schedule()[-1] == 0.5
    vgg = load_config(REPO / "configs/vgg16_cifar.yaml")
    assert len(vgg.prune.schedule()) == 20 and vgg.prune.schedule()[-1] == 0.9885


# --- round trip, hash, overrides ----------------------------------------------------------------

@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_round_trip_through_yaml(path: Path, tmp_path: Path):
    cfg = load_config(path)
    dumped = tmp_path / "resolved.yaml"
    save_config(cfg, dumped)
    again = load_config(dumped)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg


def test_defaults_fill_missing_sections(minimal: Path):
    cfg = load_config(minimal)
    assert cfg.run.name == "rdprune" and cfg.out_path == Path("runs/rdprune")
    assert cfg.prune.method == "rd" and cfg.prune.levels == 101 and cfg.prune.skip == []
    assert cfg.distributed.engine == "ddp" and cfg.finetune.rewind is False


def test_hash_changes_with_any_value(minimal: Path):
    base = load_config(minimal)
    changed = load_config(minimal, ["finetune.lr=0.02"])
    assert len(config_hash(base)) == 16 and re.fullmatch(r"[0-9a-f]{16}", config_hash(base))
    assert config_hash(base) != config_hash(changed)


def test_overrides_nested_lists_booleans_and_numbers(minimal: Path):
    cfg = load_config(minimal, [
        "prune.method=lamp", "prune.skip=[conv1, fc]", "run.resume=false", "finetune.lr=1",
        "finetune.weight_decay=1e-4", "prune.iterations=3", "run.name=2024", "model.checkpoint=ck.pt",
        "run.out_dir=/tmp/out", "prune.method=glob",
    ])
    assert cfg.prune.method == "glob"  # later overrides win
    assert cfg.prune.skip == ["conv1", "fc"]
    assert cfg.run.resume is False
    assert cfg.finetune.lr == 1.0 and isinstance(cfg.finetune.lr, float)
    assert cfg.finetune.weight_decay == pytest.approx(1e-4)
    assert cfg.prune.iterations == 3
    assert cfg.run.name == "2024"
    assert cfg.model.checkpoint == "ck.pt"
    assert cfg.out_path == Path("/tmp/out")
    assert load_config(minimal, ["prune.iterations=null"]).prune.iterations is None


def test_yaml_one_point_one_exponent_is_a_number(tmp_path: Path):
    path = write(tmp_path, MINIMAL + "finetune:\n  lr: 1e-3\n")  # PyYAML reads 1e-3 as a string
    assert load_config(path).finetune.lr == pytest.approx(1e-3)


# --- schedule -------------------------------------------------------------------------------------

@pytest.mark.parametrize("a, s, cap, expected", [
    (0.2, 0.41, None, [0.2, 0.36, 0.41]),
    (0.2, 0.36, None, [0.2, 0.36]),
    (0.2, 0.2, None, [0.2]),
    (1.0, 0.58, None, [0.58]),
    (0.6, 0.58, None, [0.58]),
    (0.5, 0.98, None, [0.5, 0.75, 0.875, 0.9375, 0.96875, 0.98]),
    (0.2, 0.5, 2, [0.2, 0.5]),
    (0.2, 0.41, 10, [0.2, 0.36, 0.41]),
    (0.5, 0.75, None, [0.5, 0.75]),
])
def test_schedule(a, s, cap, expected):
    cfg = PruneConfig(amount_per_iteration=a, target_sparsity=s, iterations=cap)
    schedule = cfg.schedule()
    assert schedule == pytest.approx(expected)
    assert schedule[-1] == s


# --- exact error text --------------------------------------------------------------------------

def test_unknown_key_names_the_nearest(tmp_path: Path):
    path = write(tmp_path, MINIMAL + "  metod: lamp\n")
    assert error_of(path) == f"{path}: unknown key 'prune.metod' (did you mean 'prune.method'?)"


def test_unknown_key_without_close_match_lists_keys(tmp_path: Path):
    path = write(tmp_path, MINIMAL.replace("model:\n", "model:\n  zzz: 1\n"))
    assert error_of(path) == f"{path}: unknown key 'model.zzz'; model has: name, checkpoint, weights, num_classes, kwargs, drop_path_rate"


def test_unknown_section(tmp_path: Path):
    path = write(tmp_path, MINIMAL + "prun:\n  method: rd\n")
    assert error_of(path) == f"{path}: unknown section 'prun' (did you mean 'prune'?)"


def test_wrong_type(tmp_path: Path):
    path = write(tmp_path, MINIMAL + "finetune:\n  steps: abc\n")
    assert error_of(path) == f"{path}: finetune.steps: expected an integer, got 'abc'"


def test_bool_is_not_an_integer(tmp_path: Path):
    path = write(tmp_path, MINIMAL + "  levels: true\n")
    assert error_of(path) == f"{path}: prune.levels: expected an integer, got true"


def test_float_is_not_an_integer(tmp_path: Path):
    path = write(tmp_path, MINIMAL + "  levels: 31.5\n")
    assert error_of(path) == f"{path}: prune.levels: expected an integer, got 31.5"


def test_optional_field_says_null_is_allowed(minimal: Path):
    assert error_of(minimal, ("run.threads=many",)) == \
        "override 'run.threads=many': run.threads: expected an integer or null, got 'many'"


def test_sparsity_of_one_is_out_of_range(tmp_path: Path):
    path = write(tmp_path, MINIMAL.replace("0.9", "1.2"))
    assert error_of(path) == f"{path}: prune.target_sparsity must be a number in [0, 1), got 1.2"
    path = write(tmp_path, MINIMAL.replace("0.9", "1"))
    assert error_of(path) == f"{path}: prune.target_sparsity must be a number in [0, 1), got 1.0"


def test_negative_steps_from_an_override(minimal: Path):
    assert error_of(minimal, ("finetune.steps=-3",)) == \
        "override 'finetune.steps=-3': finetune.steps must be an integer >= 0, got -3"
    assert error_of(minimal, ("finetune.checkpoint_every=-1",)) == \
        "override 'finetune.checkpoint_every=-1': finetune.checkpoint_every must be an integer >= 0, got -1"


def test_bad_enum_lists_allowed_values(tmp_path: Path):
    path = write(tmp_path, MINIMAL + "  method: lmap\n")
    assert error_of(path) == (f"{path}: prune.method must be one of 'rd', 'lamp', 'glob', 'unif', 'unifplus', "
                              "'erk', 'tp_l2', 'tp_l2_global', 'tp_taylor_global', 'tp_bn_scale_global', 'tp_lamp_global', "
                              "got 'lmap' (did you mean 'lamp'?)")
    assert error_of(write(tmp_path, MINIMAL + "  method: RD\n")).endswith("got 'RD' (did you mean 'rd'?)")
    assert error_of(write(tmp_path, MINIMAL + "distributed:\n  zero_stage: true\n")).endswith(
        "distributed.zero_stage must be one of 0, 1, 2, got true")


def test_override_without_equals(minimal: Path):
    assert error_of(minimal, ("prune.method",)) == \
        "override 'prune.method': expected section.key=value, e.g. prune.method=lamp"


def test_override_of_unknown_key(minimal: Path):
    assert error_of(minimal, ("prune.metod=lamp",)) == \
        "override 'prune.metod=lamp': unknown key 'prune.metod' (did you mean 'prune.method'?)"
    assert error_of(minimal, ("prune=lamp",)) == \
        "override 'prune=lamp': 'prune' is a section; set its keys as prune.<key>=value"


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    assert error_of(path) == f"{path}: config file not found"


def test_yaml_syntax_error_names_the_line(tmp_path: Path):
    path = write(tmp_path, "model:\n  name: small_cnn\n  bad: [1, 2\ndata:\n  name: mnist5k\n")
    message = error_of(path)
    assert re.fullmatch(rf"{re.escape(str(path))}: invalid YAML at line \d+, column \d+: .+", message)


def test_duplicate_key_is_an_error(tmp_path: Path):
    path = write(tmp_path, MINIMAL + "  target_sparsity: 0.5\n")
    assert error_of(path) == f"{path}: invalid YAML at line 7, column 3: duplicate key 'target_sparsity'"


def test_empty_required_name(tmp_path: Path):
    path = write(tmp_path, MINIMAL.replace("name: small_cnn", 'name: ""'))
    assert error_of(path) == f"{path}: model.name must not be empty"


def test_missing_required_key(tmp_path: Path):
    path = write(tmp_path, MINIMAL.replace("  target_sparsity: 0.9\n", "  method: rd\n"))
    assert error_of(path).startswith(f"{path}: missing required key 'prune.target_sparsity' (")


def test_cross_field_checks(minimal: Path):
    assert error_of(minimal, ("data.name=cifar10",)) == \
        "override 'data.name=cifar10': data.root is required for data.name 'cifar10'"
    assert error_of(minimal, ("data.backend=dali",)).endswith(
        "data.backend 'dali' needs data.name 'imagenet', got 'mnist5k'")
    assert error_of(minimal, ("distributed.zero_stage=2",)).endswith(
        "distributed.zero_stage 2 needs distributed.engine 'deepspeed'")
    assert error_of(minimal, ("model.weights=DEFAULT", "model.checkpoint=a.pt")).endswith(
        "model.checkpoint and model.weights are exclusive: set only one")
    deepspeed = load_config(minimal, ["distributed.engine=deepspeed", "distributed.zero_stage=2"])
    assert deepspeed.distributed.zero_stage == 2


def test_names_and_import_paths(minimal: Path):
    assert load_config(minimal, ["model.name=my_pkg.nets:build", "data.name=my_pkg.data:load"]).model.name \
        == "my_pkg.nets:build"
    assert error_of(minimal, ("data.name=cifar",)) == (
        "override 'data.name=cifar': data.name must be one of 'mnist5k', 'cifar10', 'imagenet' or an import "
        "path 'package.module:callable', got 'cifar' (did you mean 'cifar10'?)")
    assert error_of(minimal, ("model.name=pkg:",)).endswith(
        "model.name must be an import path 'package.module:callable', got 'pkg:'")


def test_hub_names_kwargs_and_their_overrides(minimal: Path):
    cfg = load_config(minimal, ["model.name=timm:vit_tiny_patch16_224", "model.kwargs={img_size: 28, depth: 2}",
                                "model.kwargs.patch_size=7", "model.drop_path_rate=0.1"])
    assert cfg.model.name == "timm:vit_tiny_patch16_224"  # a reserved prefix, not the import path 'timm' : 'vit_...'
    assert cfg.model.kwargs == {"img_size": 28, "depth": 2, "patch_size": 7}  # one entry merged into the mapping
    assert cfg.model.drop_path_rate == 0.1
    assert load_config(minimal, ["model.name=hf:facebook/deit-tiny-patch16-224"]).model.name.startswith("hf:")
    assert error_of(minimal, ("model.name=timm:",)).endswith("model.name must be timm:<name>, got 'timm:'")
    assert error_of(minimal, ("model.kwargs=3",)).endswith("model.kwargs: expected a mapping of names to values, got 3")
    assert error_of(minimal, ("model.drop_path_rate=1.5",)).endswith("model.drop_path_rate must be null or a number in [0, 1), got 1.5")


def test_semi_structured_settings(minimal: Path):
    cfg = load_config(minimal, ["prune.granularity=semi_structured", "prune.budget=layers"])
    assert (cfg.prune.granularity, cfg.prune.budget) == ("semi_structured", "layers")
    # YAML 1.1 reads an unquoted 2:4 as 2 * 60 + 4: the message says so instead of a bare "got 124".
    assert error_of(minimal, ("prune.granularity=2:4",)).endswith(
        "got 124 (YAML 1.1 reads an unquoted 2:4 as the number 124; write semi_structured)")
    assert "needs prune.granularity 'semi_structured'" in error_of(minimal, ("prune.budget=layers",))
    assert "choose weights, layers or latency" in error_of(minimal, ("prune.granularity=semi_structured", "prune.budget=flops"))
    assert error_of(minimal, ("prune.granularity=semi_structured", "prune.method=lamp")).endswith(
        "prune.method 'lamp' has no 2:4 form; at prune.granularity 'semi_structured' choose one of 'rd', 'glob'")
    assert "unstructured masks run no faster" in error_of(minimal, ("prune.budget=latency",))
    assert error_of(minimal, ("prune.granularity=semi_structured", "prune.min_density=0.6")).endswith(
        "a 2:4 layer keeps half of its weights; choose at most 0.5")


def test_weight_decay_skip_kinds(minimal: Path):
    assert load_config(minimal, ["finetune.weight_decay_skip=[norm, bias, embedding]"]).finetune.weight_decay_skip == \
        ["norm", "bias", "embedding"]
    assert error_of(minimal, ("finetune.weight_decay_skip=[norms]",)).endswith(
        "finetune.weight_decay_skip entries must be among 'norm', 'bias', 'embedding', got 'norms' (did you mean 'norm'?)")


def test_direct_construction_is_validated_too():
    with pytest.raises(UserError, match=r"^prune.amount_per_iteration must be a number in \(0, 1\], got 0.0$"):
        PruneConfig(target_sparsity=0.5, amount_per_iteration=0)


def test_reference_documents_every_key():
    table = config_reference()
    for section, values in config_to_dict(load_config(REPO / "configs/quickstart.yaml")).items():
        for key in values:
            row = next(line for line in table.splitlines() if line.startswith(f"| `{section}.{key}` |"))
            assert row.rstrip(" |").split("|")[-1].strip(), f"{section}.{key} has no docstring"


# --- CLI ---------------------------------------------------------------------------------------

CLI_SCRIPT = """\
import sys
from rdprune.cli.common import run_cli
from rdprune.errors import UserError

def main(argv):
    kind = argv[0]
    if kind == "user":
        raise UserError("configs/x.yaml: unknown key 'prune.metod' (did you mean 'prune.method'?)")
    if kind == "bug":
        raise ValueError("not from rdprune")
    if kind == "interrupt":
        raise KeyboardInterrupt
    return int(kind)

run_cli(main)
"""


def run_script(tmp_path: Path, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    script = tmp_path / "tiny_main.py"
    script.write_text(CLI_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "RDPRUNE_DEBUG"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if debug:
        env["RDPRUNE_DEBUG"] = "1"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_user_error_exits_2_with_one_line(tmp_path: Path):
    proc = run_script(tmp_path, "user")
    assert proc.returncode == 2
    assert proc.stderr == ("rdprune: error: configs/x.yaml: unknown key 'prune.metod' "
                           "(did you mean 'prune.method'?)\n")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_exit_codes_debug_and_foreign_errors(tmp_path: Path):
    assert run_script(tmp_path, "0").returncode == 0
    assert run_script(tmp_path, "3").returncode == 3
    debug = run_script(tmp_path, "user", debug=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    bug = run_script(tmp_path, "bug")  # a ValueError not raised by rdprune is a bug: show it
    assert bug.returncode == 1 and "Traceback" in bug.stderr
    interrupted = run_script(tmp_path, "interrupt")
    assert interrupted.returncode == 130 and interrupted.stderr == "rdprune: interrupted\n"


def test_value_error_from_rdprune_code_is_a_user_error(capsys):
    from rdprune.core.grid import level_amounts

    with pytest.raises(SystemExit) as info:
        run_cli(lambda argv: level_amounts(1, "relative", 0.0), [])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("rdprune: error: levels must be an integer >= 2")


def test_parse_run_args(capsys):
    assert parse_run_args(["c.yaml", "prune.method=lamp", "run.seed=1"]) == \
        (Path("c.yaml"), ["prune.method=lamp", "run.seed=1"])
    assert parse_run_args(["c.yaml"]) == (Path("c.yaml"), [])
    with pytest.raises(SystemExit) as info:
        parse_run_args([])
    assert info.value.code == 2 and capsys.readouterr().err.startswith("usage: python -m rdprune.run")


def test_usage_shows_the_overrides_as_optional(capsys):
    """Only CONFIG is required: the error for no arguments names it alone, the usage brackets the overrides."""
    with pytest.raises(SystemExit) as info:
        parse_run_args([])
    err = " ".join(capsys.readouterr().err.split())  # argparse wraps the usage at the terminal's width
    assert info.value.code == 2
    assert " config [section.key=value" in err
    assert err.endswith("error: the following arguments are required: config")
    with pytest.raises(SystemExit) as info:
        parse_run_args(["-h"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "section.key=value" in out and "prune: method, target_sparsity" in out and "distributed:" in out


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path: Path):
    path = write(tmp_path, MINIMAL + "  batch_size: 64\n")
    assert error_of(path) == f"{path}: unknown key 'prune.batch_size' (did you mean 'data.batch_size'?)"


LIGHT_ENTRY = """\
import sys
from rdprune.cli.common import run_cli
from rdprune.cli.{entry} import main
try:
    run_cli(main, sys.argv[1:])
finally:
    print("torch loaded:", "torch" in sys.modules)
"""


@pytest.mark.parametrize(("entry", "config"), [("run", "configs/quickstart.yaml"), ("compare", "configs/compare_quickstart.yaml")])
@pytest.mark.parametrize(("override", "message"), [
    ("prune.levlz=3", "unknown key 'prune.levlz' (did you mean 'prune.levels'?)"),  # a key
    ("prune.levels=many", "prune.levels: expected an integer, got 'many'"),  # a type
    ("prune.target_sparsity=1.5", "prune.target_sparsity must be a number in [0, 1), got 1.5"),  # a value
    (None, "config file not found"),  # a file
])
def test_config_errors_come_before_torch(entry: str, config: str, override: str | None, message: str):
    """A bad file, key, type or value is refused by python -m rdprune.run / compare before torch is
    imported (in well under a second), with the one-line error contract."""
    argv = [config, override] if override else ["configs/missing.yaml"]
    proc = subprocess.run([sys.executable, "-c", LIGHT_ENTRY.format(entry=entry), *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=clean_env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("rdprune: error: ") and message in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert proc.stdout == "torch loaded: False\n"


def test_a_check_against_the_data_comes_after_torch(capsys, tmp_path: Path):
    """The class count is checked against the data, which needs torch: still one line, exit 2."""
    from rdprune.cli.run import main

    with pytest.raises(SystemExit) as info:
        run_cli(main, ["configs/quickstart.yaml", "model.num_classes=3", f"run.out_dir={tmp_path / 'run'}"])
    assert info.value.code == 2
    assert "model.num_classes is 3, but data mnist5k has 10 classes" in capsys.readouterr().err
