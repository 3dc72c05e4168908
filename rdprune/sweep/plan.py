"""A comparison sweep: methods, named variants and seeds, each an ordinary run directory.

A sweep file is a normal run config plus a ``sweep:`` section. Every run starts from one pretrained
checkpoint (``<out>/pretrained/``, or the config's own model.checkpoint / model.weights), so the
seed of a run changes only fine-tuning data order and calibration sampling; with
``sweep.pretrain_per_seed`` each seed pretrains its own (``<out>/pretrained_seed<s>/``), so that
results hold across trained networks, not only across fine-tuning orders. Runs live in
``<out>/runs/<entry>_seed<s>/``; a finished one is recognised from its files and not touched
again, an interrupted one resumes inside itself through the pipeline.
"""
from __future__ import annotations

import copy
import difflib
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rdprune import distributed
from rdprune.config import Config, config_from_dict, config_hash, config_to_dict, read_yaml
from rdprune.config.schema import registered_methods
from rdprune.errors import UserError
from rdprune.pipeline.run_dir import RunLayout, read_results

if TYPE_CHECKING:
    from rdprune.distributed import DistInfo

log = logging.getLogger(__name__)

SWEEP_KEYS = ("methods", "variants", "seeds", "targets", "pretrain_per_seed", "peers")
_ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# The sweep sets these itself; a variant changing them would break "same checkpoint, same data".
_FIXED = {
    "run.seed": "it is set by sweep.seeds",
    "run.out_dir": "the sweep places every run under <out>/runs/",
    "run.name": "the sweep names every run <entry>_seed<s>",
    "calibration.curve_cache": "the sweep shares one curve cache between its runs",
    "run.resume": "it applies to the whole sweep",
    "data.name": "every run must be scored on the same data",
    "data.root": "every run must be scored on the same data",
    "distributed.engine": "the sweep opens its process group once, for the base config's engine",
    "distributed.force_process_group": "the sweep opens its process group once, as the base config says",
    "distributed.timeout_s": "the sweep opens its process group once, with the base config's timeout",
}
_FIXED_SECTIONS = {
    "model": "every run starts from the same pretrained checkpoint",
    "pretrain": "pretraining happens once for the whole sweep",
}


@dataclass(frozen=True)
class SweepSpec:
    """The parsed ``sweep:`` section: entries (method name or variant name -> dotted overrides) and seeds."""

    entries: dict[str, dict[str, Any]]
    seeds: list[int]
    variants: frozenset[str]
    targets: list[float] | None = None  # one run per target (prune.target_sparsity), or the config's one
    pretrain_per_seed: bool = False  # each seed pretrains its own checkpoint (run.seed = the seed)
    peers: tuple[str, ...] = ()  # entries the tables compare every other entry with, seed by seed


@dataclass(frozen=True)
class PlannedRun:
    """One (entry, seed[, target]) run and its resolved config."""

    entry: str
    seed: int
    cfg: Config
    target: float | None = None


@dataclass(frozen=True)
class SweepPlan:
    """Everything a sweep will do, validated before any work starts."""

    out: Path
    base: Config
    pretrain: Config | None  # the first (or only) pretraining run; None when the config brings its own checkpoint
    runs: list[PlannedRun] = field(default_factory=list)
    pretrains: list[Config] = field(default_factory=list)  # every pretraining run (one per seed with pretrain_per_seed)
    peers: tuple[str, ...] = ()

    @property
    def entries(self) -> list[str]:
        return list(dict.fromkeys(r.entry for r in self.runs))

    @property
    def seeds(self) -> list[int]:
        return list(dict.fromkeys(r.seed for r in self.runs))


def _nearest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f"; allowed: {', '.join(options)}"


def _apply_sweep_overrides(sweep: dict, overrides: Sequence[str]) -> None:
    """``sweep.key=value`` overrides (value as YAML) replace whole keys of the sweep section."""
    for text in overrides:
        dotted, _, raw = text.partition("=")
        key = dotted.strip().removeprefix("sweep.")
        if key not in SWEEP_KEYS:
            raise UserError(f"override {text!r}: unknown key 'sweep.{key}'{_nearest(key, SWEEP_KEYS)}")
        try:
            sweep[key] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise UserError(f"override {text!r}: invalid YAML: {' '.join(str(err).split())}") from None


def parse_sweep(section: Any, label: str) -> SweepSpec:
    """Check the ``sweep:`` section strictly (keys, method names, variant names, seeds)."""
    if not isinstance(section, dict):
        raise UserError(f"{label}: section 'sweep' must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in section:
        if key not in SWEEP_KEYS:
            raise UserError(f"{label}: unknown key 'sweep.{key}'{_nearest(str(key), SWEEP_KEYS)}")
    methods = section.get("methods") or []
    known = registered_methods()
    if not isinstance(methods, list):
        raise UserError(f"{label}: sweep.methods must be a list of method names ({', '.join(known)})")
    entries: dict[str, dict[str, Any]] = {}
    for m in methods:
        if m not in known:
            raise UserError(f"{label}: sweep.methods lists {m!r}, not a method{_nearest(str(m), known)}")
        if m in entries:
            raise UserError(f"{label}: sweep.methods lists {m!r} more than once")
        entries[m] = {"prune.method": m}
    variants = section.get("variants") or {}
    if not isinstance(variants, dict):
        raise UserError(f"{label}: sweep.variants must be a mapping of name -> {{section.key: value, ...}}")
    for name, overrides in variants.items():
        where = f"sweep.variants.{name}"
        if not isinstance(name, str) or not _ENTRY_NAME.match(name):
            raise UserError(f"{label}: {where}: a variant name must be letters, digits, '_', '-' or '.', e.g. rd_oneshot")
        if name in entries:
            raise UserError(f"{label}: {where}: the name is already used by sweep.methods; pick another")
        if not isinstance(overrides, dict) or not overrides:
            raise UserError(f"{label}: {where} must be a non-empty mapping of section.key: value, e.g. {{prune.distortion: worst_case}}")
        entries[name] = {str(k): v for k, v in overrides.items()}
    if not entries:
        raise UserError(f"{label}: the sweep lists no runs: give sweep.methods and/or sweep.variants")
    seeds = section.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise UserError(f"{label}: sweep.seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{label}: sweep.seeds lists a seed more than once: {seeds}")
    targets = section.get("targets")
    if targets is not None:
        if (not isinstance(targets, list) or not targets or len(set(targets)) != len(targets)
                or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1 for t in targets)):
            raise UserError(f"{label}: sweep.targets must be a non-empty list of distinct sparsities in (0, 1), "
                            f"e.g. [0.5, 0.7, 0.9], got {targets!r}")
        targets = sorted(float(t) for t in targets)
    per_seed = section.get("pretrain_per_seed", False)
    if not isinstance(per_seed, bool):
        raise UserError(f"{label}: sweep.pretrain_per_seed must be true or false, got {per_seed!r}")
    peers = section.get("peers") or []
    if not isinstance(peers, list) or any(p not in entries for p in peers) or len(set(peers)) != len(peers):
        raise UserError(f"{label}: sweep.peers must list entries of the sweep (methods or variant names) once each, "
                        f"e.g. [tp_l2_global], got {peers!r}; entries: {', '.join(entries)}")
    return SweepSpec(entries, list(seeds), frozenset(variants), targets, per_seed, tuple(peers))


def _nest(overrides: Mapping[str, Any], where: str, label: str) -> dict[str, dict[str, Any]]:
    """``{"prune.method": "rd"}`` -> ``{"prune": {"method": "rd"}}``, refusing keys the sweep owns."""
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        section, dot, key = dotted.partition(".")
        if not dot or not key or "." in key:
            raise UserError(f"{label}: {where}: {dotted!r} is not a section.key name, e.g. prune.distortion")
        if section in _FIXED_SECTIONS:
            raise UserError(f"{label}: {where}: {dotted} cannot vary within a sweep: {_FIXED_SECTIONS[section]}")
        if dotted in _FIXED:
            raise UserError(f"{label}: {where}: {dotted} cannot vary within a sweep: {_FIXED[dotted]}")
        nested.setdefault(section, {})[key] = value
    return nested


def _with(resolved: dict, changes: Mapping[str, Mapping[str, Any]]) -> dict:
    data = copy.deepcopy(resolved)
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    return data


def _identity(cfg: Config) -> str:
    """The config without run.name/out_dir: two entries with equal identities would be the same runs."""
    data = config_to_dict(cfg)
    data["run"] = {k: v for k, v in data["run"].items() if k not in ("name", "out_dir")}
    return json.dumps(data, sort_keys=True)


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepPlan:
    """Read a sweep file, apply ``section.key=value`` (and ``sweep.key=value``) overrides, and build
    and validate every run's Config before any work starts. Raises a one-line UserError."""
    path = Path(path)
    label = str(path)
    data = read_yaml(path)  # the config's own strict reader: duplicate keys are errors too
    sweep = data.pop("sweep", None)
    if sweep is None:
        raise UserError(f"{label}: no 'sweep' section; a comparison needs sweep.methods and/or sweep.variants and sweep.seeds")
    if not isinstance(sweep, dict):
        raise UserError(f"{label}: section 'sweep' must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    sweep = dict(sweep)
    _apply_sweep_overrides(sweep, [o for o in overrides if o.strip().startswith("sweep.")])
    spec = parse_sweep(sweep, label)
    base = config_from_dict(data, [o for o in overrides if not o.strip().startswith("sweep.")], label=label)
    resolved = config_to_dict(base)
    out = base.out_path

    pretrains: dict[int | None, Config] = {}
    checkpoints: dict[int | None, str | None] = {None: base.model.checkpoint}
    if base.model.checkpoint is None and base.model.weights is None:
        for seed in spec.seeds if spec.pretrain_per_seed else [None]:
            folder = "pretrained" if seed is None else f"pretrained_seed{seed}"
            pre = copy.deepcopy(resolved)
            pre["run"].update(name=folder, out_dir=str(out / folder), **({} if seed is None else {"seed": seed}))
            # Only model, data and pretrain shape the checkpoint: fixed pruning and fine-tuning sections
            # let a sweep whose pruning or fine-tuning changed later still find (and reuse) it.
            pre["calibration"] = {"bn_recalibration": False}
            pre["finetune"] = {"steps": 0}
            pre["prune"] = {"method": "unif", "target_sparsity": 0.0, "amount_per_iteration": 1.0}
            pretrains[seed] = config_from_dict(pre, label=f"{label}: pretraining run")
            # Absolute, so the runs' resume keys do not depend on how out_dir was spelled or on the cwd.
            checkpoints[seed] = str((out / folder / "pretrained.pt").resolve())

    runs: list[PlannedRun] = []
    seen: dict[str, str] = {}
    # Curves are cached by model weights, inputs and settings: runs from one checkpoint with the same
    # calibration (e.g. one-shot runs to several targets) measure their dense curves once.
    shared = {"curve_cache": str((out / "curve_cache").resolve())}
    for entry, entry_overrides in spec.entries.items():
        where = f"sweep.variants.{entry}" if entry in spec.variants else f"sweep.methods {entry!r}"
        changes = _nest(entry_overrides, where, label)
        if "target_sparsity" in changes.get("prune", {}) and spec.targets is not None:
            raise UserError(f"{label}: {where}: prune.target_sparsity cannot vary within a sweep that lists sweep.targets")
        for seed in spec.seeds:
            for target in spec.targets or [None]:
                name = f"{entry}_seed{seed}" if target is None else f"{entry}_target{100 * target:g}_seed{seed}"
                run_changes = _with(changes, {
                    "run": {"name": name, "out_dir": str(out / "runs" / name), "seed": seed},
                    "model": {"checkpoint": checkpoints.get(seed, checkpoints.get(None))},
                    "calibration": shared,
                    **({"prune": {**changes.get("prune", {}), "target_sparsity": target}} if target is not None else {}),
                })
                cfg = config_from_dict(_with(resolved, run_changes), label=f"{label}: {where}")
                runs.append(PlannedRun(entry, seed, cfg, target))
        identity = _identity(runs[-1].cfg)
        if identity in seen:
            raise UserError(f"{label}: {where} resolves to the same runs as {seen[identity]}; drop one of them")
        seen[identity] = where
    # Seeds outermost: an unfinished sweep still holds every method at the first seeds.
    runs.sort(key=lambda r: spec.seeds.index(r.seed))
    first = next(iter(pretrains.values()), None)
    return SweepPlan(out=out, base=base, pretrain=first, runs=runs, pretrains=list(pretrains.values()), peers=spec.peers)


def check_plan(plan: SweepPlan, dist: DistInfo) -> None:
    """Every unfinished run's model, data and pruning checked as its run will check them (``check_run``),
    before the shared pretraining: a variant or target out of reach fails now, not hours in. Runs that
    differ only in seed, fine-tuning or the method are checked once, and the data is loaded once."""
    from rdprune.pipeline.loop import check_run  # torch: load_sweep refuses a bad sweep before it is imported

    finished = [finished_rows(r.cfg) is not None for r in plan.runs] if dist.is_main and plan.base.run.resume else None
    finished = distributed.broadcast_object(finished) or [False] * len(plan.runs)
    checked: set[str] = set()
    data = None
    for planned, done in zip(plan.runs, finished):
        resolved = config_to_dict(planned.cfg)
        resolved["prune"].pop("method")
        key = json.dumps({s: resolved[s] for s in ("model", "data", "calibration", "prune", "latency")}, sort_keys=True, default=str)
        if done or key in checked:
            continue
        checked.add(key)
        try:
            data = check_run(planned.cfg, dist, data)  # model and data.name/root are fixed within a sweep: one load serves all
        except UserError as exc:
            at = f" at sweep.targets {planned.target:g}" if planned.target is not None else ""
            raise UserError(f"sweep run {planned.entry!r}{at}: {exc}") from None


def plan_hash(plan: SweepPlan) -> str:
    """One hash over every run's resolved config, for checking that all ranks plan the same sweep."""
    configs = list(plan.pretrains)
    configs += [r.cfg for r in plan.runs]
    return distributed.fingerprint([config_hash(c) for c in configs])


def finished_rows(cfg: Config) -> list[dict] | None:
    """The results of a completed run of exactly ``cfg`` (every scheduled iteration recorded, final
    model and plots written, same resume key), or None when the run still has work to do."""
    from rdprune.pipeline.loop import same_run

    out = RunLayout(cfg.out_path)
    try:
        rows = read_results(out.root)
        key = json.loads(out.resume_key.read_text())
    except (OSError, ValueError):
        return None
    if not same_run(key, cfg):
        return None
    if [r.get("iteration") for r in rows] != list(range(len(cfg.prune.schedule()) + 1)):
        return None
    if not all(p.exists() for p in (out.final_model, out.final_masks, out.plot("accuracy"))):
        return None
    return rows


def _run_or_reuse(cfg: Config, dist: DistInfo) -> tuple[list[dict], bool]:
    """(rows, reused): a finished run is read back, untouched; anything else goes through the pipeline."""
    done = finished_rows(cfg) if dist.is_main and cfg.run.resume else None
    done = distributed.broadcast_object(done)
    if done is not None:
        return done, True
    from rdprune.pipeline.loop import run

    return run(cfg, dist), False


def run_sweep(
    plan: SweepPlan,
    dist: DistInfo,
    on_progress: Callable[[dict[str, dict[int, list[dict]]]], None] | None = None,
) -> dict[str, dict[int, list[dict]]]:
    """Pretrain once (unless a checkpoint is given), then every planned run in order.

    Returns ``{entry: {seed: rows}}`` (with ``sweep.targets``, the rows of every target's run,
    the dense iteration 0 once); ``on_progress`` (rank 0 only) gets the results so far after every
    run, so an unfinished sweep still leaves up-to-date tables.
    """
    for pretrain in plan.pretrains:
        _, reused = _run_or_reuse(pretrain, dist)
        log.info("pretrained checkpoint %s (%s)", pretrain.out_path / "pretrained.pt", "reused" if reused else "trained now")
    results: dict[str, dict[int, list[dict]]] = {}
    for i, planned in enumerate(plan.runs, 1):
        log.info("sweep run %d/%d: %s, seed %d -> %s", i, len(plan.runs), planned.entry, planned.seed, planned.cfg.out_path)
        rows, reused = _run_or_reuse(planned.cfg, dist)
        if reused:
            log.info("sweep run %d/%d: finished earlier, reusing its results", i, len(plan.runs))
        collected = results.setdefault(planned.entry, {}).setdefault(planned.seed, [])
        if planned.target is not None:  # a target's run contributes its last iteration, not its way there
            rows = rows[:1] + [r for r in rows[1:] if abs(r["target_sparsity"] - planned.target) < 1e-9]
        collected.extend(rows if not collected else [r for r in rows if r["iteration"] > 0])
        if on_progress is not None and dist.is_main:
            on_progress(results)
    return results
