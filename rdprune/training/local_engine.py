"""Training in this process, wrapped in DDP when there are several ranks."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from rdprune import distributed
from rdprune.core.masks import MaskGuard, Masks
from rdprune.distributed import DistInfo
from rdprune.files import atomic_torch_save
from rdprune.training.checkpoint import LOCAL_FILE
from rdprune.training.rng import rng_state, set_rng_state


class LocalEngine:
    """Training in this process, wrapped in DDP when there are several ranks.

    Pruned weights stay exactly zero: a :class:`MaskGuard` masks their gradients and re-applies
    the masks after every optimiser step. ``precision`` bf16 runs forward and loss under bf16
    autocast; weights, gradients and the optimiser state stay fp32.
    :class:`rdprune.training.deepspeed_engine.DeepSpeedEngine` is the other :class:`rdprune.training.engine.Engine`.
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
        precision: str = "fp32",
    ):
        self.model = distributed.wrap_ddp(model, dist)
        self.autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        self.optimizer, self.scheduler, self.device, self.rank = optimizer, scheduler, dist.device, dist.rank
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self._guard = MaskGuard(layers, masks, optimizer) if masks is not None else None

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimiser step on this rank's batch; its loss."""
        self.model.train()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.autocast:
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
