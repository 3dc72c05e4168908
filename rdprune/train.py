"""Step-based training and evaluation: the engine the pipeline calls for pretraining and fine-tuning.

An engine (plain/DDP here, DeepSpeed in :mod:`rdprune.deepspeed_engine`) owns one optimiser step;
:func:`train_steps` drives either. Evaluation reduces its sums across ranks through
:mod:`rdprune.distributed`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from rdprune import distributed
from rdprune.config import TrainingConfig
from rdprune.core.masks import MaskGuard, Masks, atomic_torch_save
from rdprune.distributed import DistInfo
from rdprune.finetune_checkpoint import LOCAL_FILE

if TYPE_CHECKING:
    from rdprune.deepspeed_engine import DeepSpeedEngine


def make_optimizer(params, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov), Adam or AdamW, with weight decay, from a pretrain/finetune section."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be sgd, adam or adamw, got {cfg.optimizer!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine to zero, a step decay (x0.1 at 50 % and 75 % of the steps), or constant."""
    warm = min(cfg.warmup_steps, steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.scheduler == "step":
            return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LocalEngine:
    """Training in this process, wrapped in DDP when there are several ranks.

    Pruned weights stay exactly zero: a :class:`MaskGuard` masks their gradients and re-applies
    the masks after every optimiser step. :class:`rdprune.deepspeed_engine.DeepSpeedEngine` is the
    other engine; both offer ``train_step``, ``save``, ``load`` and ``close``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        dist: DistInfo,
        *,
        layers: Mapping[str, nn.Module] | None = None,
        masks: Masks | None = None,
        label_smoothing: float = 0.0,
    ):
        self.model = distributed.wrap_ddp(model, dist)
        self.optimizer, self.scheduler, self.device, self.rank = optimizer, scheduler, dist.device, dist.rank
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self._guard = MaskGuard(layers, masks, optimizer) if masks is not None else None

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimiser step on this rank's batch; its loss."""
        self.model.train()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        loss = self.criterion(self.model(x), y)
        if not torch.isfinite(loss):
            raise ValueError(f"training loss became {loss.item()}; lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    def save(self, directory: Path, iteration: int, step: int) -> None:
        """The training state after ``step`` steps of ``iteration``, written by rank 0 to ``directory/finetune.pt``.

        Every rank must call it: each rank's random state (dropout, augmentation) goes in too.
        """
        rngs = distributed.gather_objects(rng_state(self.device))
        if rngs is not None:
            atomic_torch_save({
                "engine": "ddp", "world_size": len(rngs), "iteration": iteration, "step": step,
                "model": _unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rngs,
            }, directory / LOCAL_FILE)
        distributed.barrier()

    def load(self, directory: Path) -> int:
        """Restore :meth:`save`'s state on every rank; the step it was saved after."""
        state = torch.load(directory / LOCAL_FILE, map_location="cpu", weights_only=True)
        _unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][self.rank], self.device)
        return state["step"]

    def close(self) -> None:
        if self._guard is not None:
            self._guard.remove()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random state: the CPU generator's, and the device's on CUDA."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Restore :func:`rng_state`'s result."""
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def train_steps(
    engine: LocalEngine | DeepSpeedEngine,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    *,
    start: int = 0,
    every: int = 0,
    checkpoint: Callable[[int], None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> float:
    """Run engine steps ``start+1 .. steps`` on ``batches``; return this rank's mean training loss over them.

    ``checkpoint(step)``, when given, is called after every ``every``-th step but the last
    (the caller records the end of training itself).
    """
    total = 0.0
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        loss = engine.train_step(*next(batches))
        total += loss
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        done = step + 1
        if checkpoint is not None and every and done % every == 0 and done < steps:
            checkpoint(done)
    return total / max(1, steps - start)


def rank_subset(dataset: Dataset, dist: DistInfo) -> Dataset:
    """Every ``world_size``-th sample from ``rank``: the ranks cover the set exactly once (no padding)."""
    if dist.world_size == 1:
        return dataset
    return Subset(dataset, range(dist.rank, len(dataset), dist.world_size))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], dist: DistInfo, *, progress: bool = True) -> tuple[float, float]:
    """Top-1 accuracy in percent and mean cross-entropy over the whole (rank-sharded) set."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for x, y in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
        logits = model(x)
        sums[0] += float((logits.argmax(1) == y).sum())
        sums[1] += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
        sums[2] += y.numel()
    correct, loss, count = distributed.all_reduce_sum(sums).tolist()
    if count == 0:
        raise ValueError("the evaluation set is empty")
    return 100.0 * correct / count, loss / count
