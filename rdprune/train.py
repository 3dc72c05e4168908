"""Step-based training and evaluation: the engine the pipeline calls for pretraining and fine-tuning.

An engine (plain/DDP here, DeepSpeed in :mod:`rdprune.deepspeed_engine`) owns one optimiser step;
:func:`train_steps` drives either. Evaluation reduces its sums across ranks through
:mod:`rdprune.distributed`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from rdprune import distributed
from rdprune.config import TrainingConfig
from rdprune.core.masks import MaskGuard, Masks
from rdprune.distributed import DistInfo

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
    other engine; both offer ``train_step`` and ``close``.
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
        self.optimizer, self.scheduler, self.device = optimizer, scheduler, dist.device
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

    def close(self) -> None:
        if self._guard is not None:
            self._guard.remove()


def train_steps(
    engine: LocalEngine | DeepSpeedEngine,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    *,
    desc: str = "train",
    progress: bool = True,
) -> float:
    """Run ``steps`` engine steps on ``batches``; return this rank's mean training loss."""
    total = 0.0
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for _ in bar:
        loss = engine.train_step(*next(batches))
        total += loss
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    return total / max(1, steps)


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
