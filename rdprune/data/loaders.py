"""Deterministic data loaders, sharded by rank, and an endless batch stream for step-based training."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from rdprune.errors import UserError
from rdprune.stop import ignore_in_worker


class SeededShuffle(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``seed + epoch``: reproducible per epoch, so a run
    resumed at epoch k sees the batches an uninterrupted run would."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def train_loader(dataset: Dataset, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 workers: int = 0) -> DataLoader:
    """A DataLoader of this rank's share of ``dataset`` for training, ``batch_size`` per rank.

    Shuffled by ``seed`` (per epoch via ``set_epoch``; DistributedSampler with ``drop_last`` when
    ``world_size > 1``), incomplete last batches dropped. Worker augmentation seeds derive from
    ``seed`` and ``rank``. (Evaluation shards the test set in order: ``pipeline.feeding``.)
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    per_rank = len(dataset) // world_size
    if per_rank < batch_size:
        raise UserError(f"the batch size per rank ({batch_size}) exceeds the {per_rank} training samples "
                        f"each of {world_size} rank(s) gets; lower data.batch_size")
    if world_size > 1:
        sampler: Sampler[int] = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                   seed=seed, drop_last=True)
    else:
        sampler = SeededShuffle(len(dataset), seed)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_in_worker,
        generator=torch.Generator().manual_seed(seed * 1000 + rank),
    )


def infinite_batches(loader: DataLoader, start_epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield batches forever, calling the sampler's ``set_epoch`` before each pass over the data."""
    epoch = start_epoch
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader yields no batch: the dataset is smaller than one batch")
        epoch += 1
