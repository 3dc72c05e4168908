"""Evaluation: top-1 and mean loss over a rank-sharded set, reduced across ranks."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from rdprune import distributed
from rdprune.distributed import DistInfo


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], dist: DistInfo, *, progress: bool = True
) -> tuple[float, float]:
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
