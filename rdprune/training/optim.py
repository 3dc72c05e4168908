"""Optimisers and learning-rate schedules built from a pretrain/finetune config section."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from rdprune import registry

if TYPE_CHECKING:  # the config is a leaf: imported for type checking only, never at run time
    from rdprune.config.schema import TrainingConfig

log = logging.getLogger(__name__)

EMBEDDING_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "mask_token", "absolute_pos_embed",
                   "position_embeddings", "relative_position_bias_table", "distillation_token", "register_tokens")
"""Parameter names (last component) of position embeddings and learned tokens, in timm and Hugging Face models."""


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def parameter_groups(model: nn.Module, weight_decay: float, skip: Iterable[str]) -> list[dict]:
    """The model's trainable parameters as optimiser groups: with ``weight_decay``, and without it for the
    kinds in ``skip`` (norm, bias, embedding) that DeiT-style recipes exempt from decay.

    Normalisation layers are nn's norms (BatchNorm, LayerNorm, GroupNorm, RMSNorm and subclasses) and any
    module whose class name contains "Norm" (timm's and Hugging Face's own LayerNorms); embeddings are
    the names in ``EMBEDDING_NAMES`` and whatever a timm model's ``no_weight_decay()`` lists.
    """
    skip = set(skip)
    listed = set(model.no_weight_decay()) if "embedding" in skip and callable(getattr(model, "no_weight_decay", None)) else set()
    decay, exempt, seen = [], [], set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORMS) or "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # a shared parameter (tied weights) is stepped once
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            free = (("norm" in skip and is_norm) or ("bias" in skip and name == "bias")
                    or ("embedding" in skip and (name in EMBEDDING_NAMES or full in listed or name in listed)))
            (exempt if free else decay).append(param)
    if skip:
        log.info("weight decay on %d parameter tensors, none on %d (%s)", len(decay), len(exempt), ", ".join(sorted(skip)))
    groups = [{"params": decay, "weight_decay": weight_decay}]
    return groups + ([{"params": exempt, "weight_decay": 0.0}] if exempt else [])


def make_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov), Adam or AdamW, with weight decay (none on ``weight_decay_skip``'s
    kinds), from a pretrain/finetune section."""
    params = parameter_groups(model, cfg.weight_decay, cfg.weight_decay_skip)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(registry.OPTIMIZERS.names())}, got {cfg.optimizer!r}")


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
