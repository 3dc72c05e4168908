"""The protocol between the pipeline and a granularity, and what every granularity shares.

The run loop (:mod:`rdprune.pipeline.loop`) builds one :class:`GranularityStage` per run from the
class its :class:`~rdprune.granularity.spec.GranularitySpec` names, and then only calls the methods
below: which layers carry masks and what counts in the sparsity, the choice of an iteration (the
same on every rank: curves sharded over ranks, the allocation or a baseline on rank 0, broadcast),
what the allocation file and the end of the run add. A new granularity is a package that registers
a spec and implements this class; nothing in the pipeline, the sweeps or the CLI changes.
"""
from __future__ import annotations

import contextlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from rdprune import distributed
from rdprune.core.grid import Curve
from rdprune.core.masks import Masks
from rdprune.errors import UserError
from rdprune.files import write_json

if TYPE_CHECKING:
    from rdprune.config import Config
    from rdprune.distributed import DistInfo
    from rdprune.granularity.spec import GranularitySpec
    from rdprune.pipeline.run_dir import RunLayout

log = logging.getLogger(__name__)


@dataclass
class StageInputs:
    """What a granularity's stage is built from: the run, the dense model and its prunable layers."""

    cfg: Config
    dist: DistInfo
    out: RunLayout
    model: nn.Module
    input_shape: tuple[int, ...]
    layers: dict[str, nn.Module]
    """Prunable layers in execution order, ``prune.skip`` left out."""
    flops: dict[str, int]
    """Their dense FLOPs per sample."""
    skipped_weights: int
    """Weights of the prunable layers ``prune.skip`` keeps dense."""
    skipped_flops: int


@dataclass
class Choice:
    """One iteration's choice as every rank applies it."""

    masks: Masks
    """Keep-masks of the layers the choice prunes, already applied to the model."""
    info: dict[str, Any] = field(default_factory=dict)
    """What the results row records about the choice (predicted distortion, costs, latency, ...)."""
    curves: dict[str, Curve] | None = None
    """The units' curves (rank 0, RD only), saved beside the run and plotted."""


class GranularityStage(ABC):
    """What a run keeps of its granularity between iterations, and the calls the pipeline makes to it."""

    spec: ClassVar[GranularitySpec]

    def __init__(self, layers: dict[str, nn.Module], flops: dict[str, int], dense_weights: int, dense_flops: int):
        self.layers = layers
        """The layers that carry masks, in execution order; the sparsity of a results row counts their weights."""
        self.flops = flops
        """Their dense FLOPs per sample."""
        self.dense_weights = dense_weights
        """Weights that stay dense and still count in the sparsity's denominator."""
        self.dense_flops = dense_flops

    @classmethod
    def precheck(cls, cfg: Config, dist: DistInfo) -> None:
        """Refuse now what needs no model (a device, a timeout): a sweep calls it before its shared pretraining."""

    @classmethod
    @abstractmethod
    def build(cls, setup: StageInputs) -> GranularityStage:
        """The stage of a run: units, costs and tables, with every check that can fail before any work."""

    @abstractmethod
    def choose(self, model: nn.Module, iteration: int, target: float, inputs: torch.Tensor | None, *,
               progress: bool, labels: torch.Tensor | None = None) -> Choice:
        """Prune ``model`` to ``target`` (the same choice on every rank) and apply it.

        ``inputs`` are the calibration inputs (method rd, or a stage that :attr:`needs_inputs`; else None),
        ``labels`` their labels where the stage :attr:`needs_labels`."""

    @property
    def needs_labels(self) -> bool:
        """Whether :meth:`choose` needs the calibration images and their labels whatever the method (a data-aware
        ranking)."""
        return False

    @property
    def needs_inputs(self) -> bool:
        """Whether :meth:`choose` needs the calibration inputs whatever the method (a data-aware ranking)."""
        return self.needs_labels

    def measurement(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The context in which the network's outputs are measured as the curves measured them (e.g. BatchNorm
        renormalised on the calibration inputs), for the distortion of the whole pruned network."""
        return contextlib.nullcontext()

    def units(self) -> list[str]:
        """The allocation's units in execution order (the curves' names)."""
        return list(self.layers)

    @property
    def distortion_comparable(self) -> bool:
        """Whether the curves measure the network the stale-statistics pass after pruning runs, so that the
        predicted distortion can be compared with the measured one."""
        return True

    def save_state(self, out: RunLayout) -> None:
        """Keep what a resumed run must reuse (rank 0, under the run's lock), e.g. a measured latency table."""

    def allocation_record(self) -> dict[str, Any]:
        """What the allocation file of an iteration adds to the per-layer sparsity."""
        return {}

    def finish(self, model: nn.Module, out: RunLayout, device: torch.device) -> None:
        """The end of a run (rank 0), after the final model and plots: exports, reports."""


def stage_class(cfg: Config) -> type[GranularityStage]:
    """The stage class of the config's granularity."""
    from rdprune.granularity.spec import spec_of

    return spec_of(cfg.prune.granularity).stage_class()


def shared_table(path: Path, *, resume: bool, dist: DistInfo, check: Callable[[dict], str | None],
                 build: Callable[[], dict], what: str) -> dict:
    """A measured table every rank uses: rank 0 reuses ``path`` (a resumed run) or builds it, then broadcasts it.

    ``check(table)`` says why a stored table does not fit this run (another model, batch or device),
    or None; a table that does not fit, or cannot be read, stops the run in one line rather than be
    reused silently. :func:`save_table` keeps a built table once the run owns its directory.
    """
    data = None
    if dist.is_main:
        if resume and path.is_file():
            try:
                data = json.loads(path.read_text())
                problem = check(data) if isinstance(data, dict) else "not a JSON object"
            except (ValueError, KeyError, TypeError) as exc:
                problem = f"not readable ({str(exc)[:120]})"
            if problem is not None:
                raise UserError(f"{path} is not a {what} of this run: {problem}; delete it to measure a new one, "
                                "or set run.resume=false")
            log.info("%s: reusing %s", what, path)
        else:
            data = build()
    return distributed.broadcast_object(data)


def save_table(path: Path, table: dict | None) -> None:
    """Keep a measured table in the run directory (rank 0), so that a resumed run solves with the same one."""
    if table is not None and not path.exists():
        write_json(path, table)


def chosen_once(path: Path, target: float, dist: DistInfo, prepare: Callable[[], Any],
                solve: Callable[[Any], tuple[Any, dict]]) -> tuple[Any, dict, Any]:
    """An iteration's choice and row info, made on rank 0 once and kept in ``path`` until the iteration is recorded.

    A choice that depends on timings must not change when an interrupted iteration resumes (its
    fine-tuning checkpoint holds masks of the first choice): the stored one is reused instead.
    Otherwise ``prepare()`` runs on every rank (e.g. the sharded curves) and ``solve(prepared)`` on
    rank 0. Returns (choice, info, prepared); every rank gets the choice and info.
    """
    kept = None
    if dist.is_main and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("target") == target:
            kept = saved["removal"], saved["info"]
            log.info("reusing the removal chosen for this iteration before the interruption (%s)", path)
    if distributed.broadcast_object(kept is not None):
        chosen, info = distributed.broadcast_object(kept)
        return chosen, info, None
    prepared = prepare()
    chosen = info = None
    if dist.is_main:
        chosen, info = solve(prepared)
        write_json(path, {"target": target, "removal": chosen, "info": info})  # "removal": the key of earlier versions
    chosen, info = distributed.broadcast_object((chosen, info))
    return chosen, info, prepared
