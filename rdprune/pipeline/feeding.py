"""How the loop gets its batches, whatever the data backend: training, evaluation, calibration.

Every function yields or returns plain ``(x, y)`` tensors, so the loop never knows whether the
torchvision or the DALI backend produced them.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from rdprune.config import Config
from rdprune.core.curves import synthetic_inputs
from rdprune.data import DataBundle, calibration_inputs, dali, infinite_batches, train_loader
from rdprune.data.calibration import calibration_labels as labels_of_draw
from rdprune.data.preprocessing import RESNET, Preprocessing
from rdprune.distributed import DistInfo
from rdprune.stop import ignore_in_worker


def uses_dali(cfg: Config) -> bool:
    """dali when asked for; auto picks it for ImageNet when the run computes on CUDA and DALI is installed."""
    backend = cfg.data.backend
    if backend == "auto":
        on_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
        return cfg.data.name == "imagenet" and on_cuda and dali.dali_available()
    return backend == "dali"


def train_batches(cfg: Config, data: DataBundle, dist: DistInfo, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled training batches of this rank's share of the global batch."""
    per_rank = max(1, cfg.data.batch_size // dist.world_size)
    if uses_dali(cfg):
        return dali.train_batches(dali.folder_samples(data.train), per_rank, dist.rank, dist.world_size,
                                  dist.device, seed, threads=max(1, cfg.data.workers),
                                  preprocessing=_preprocessing(data))
    loader = train_loader(data.train, per_rank, seed=seed, rank=dist.rank, world_size=dist.world_size, workers=cfg.data.workers)
    return infinite_batches(loader)


def eval_batches(cfg: Config, data: DataBundle, dist: DistInfo) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the test set: the ranks together see every sample exactly once."""
    per_rank = max(1, cfg.data.eval_batch_size // dist.world_size)
    if uses_dali(cfg):
        return dali.eval_batches(dali.folder_samples(data.test), per_rank, dist.rank, dist.world_size,
                                 dist.device, threads=max(1, cfg.data.workers), preprocessing=_preprocessing(data))
    return DataLoader(rank_subset(data.test, dist), batch_size=per_rank, num_workers=cfg.data.workers,
                      worker_init_fn=ignore_in_worker)


def calibration(cfg: Config, data: DataBundle) -> torch.Tensor:
    """The calibration inputs, identical on every rank and in every run with the same seed."""
    cal = cfg.calibration
    if cal.source == "synthetic":
        return synthetic_inputs(cal.size, data.input_shape, seed=cfg.run.seed)
    return _training_draw(cfg, data, cal.size, "calibration.size")


def calibration_labels(cfg: Config, data: DataBundle) -> torch.Tensor:
    """The labels of the calibration images, in their order (for rankings that need a loss)."""
    size = cfg.calibration.size
    if uses_dali(cfg):
        samples = dali.folder_samples(data.calibration_pool)
        chosen = dali.calibration_choice(len(samples), size, cfg.run.seed, "calibration.size")
        return torch.tensor([samples[i][1] for i in chosen], dtype=torch.long)
    return labels_of_draw(data.calibration_pool, size, cfg.run.seed)


def recalibration(cfg: Config, data: DataBundle) -> torch.Tensor:
    """The images BatchNorm statistics are re-estimated on: ``bn_images`` of the same seeded draw as
    the calibration inputs, un-augmented, identical on every rank."""
    return _training_draw(cfg, data, cfg.calibration.bn_images, "calibration.bn_images")


def _training_draw(cfg: Config, data: DataBundle, size: int, key: str) -> torch.Tensor:
    """``size`` un-augmented training images drawn by the run's seed, from either backend (``key``
    names the config key that asked for ``size`` in the error for an impossible size)."""
    if uses_dali(cfg):
        return dali.calibration_images(dali.folder_samples(data.calibration_pool), size, cfg.run.seed,
                                       cfg.calibration.batch_size, threads=max(1, cfg.data.workers), key=key,
                                       preprocessing=_preprocessing(data))
    return calibration_inputs(data.calibration_pool, size, seed=cfg.run.seed, key=key)


def _preprocessing(data: DataBundle) -> Preprocessing:
    """What the DALI pipelines apply: the bundle's preprocessing, or the classic ``RESNET`` recipe for
    image folders that came without one (user data)."""
    return data.preprocessing or RESNET


def rank_subset(dataset: Dataset, dist: DistInfo) -> Dataset:
    """Every ``world_size``-th sample from ``rank``: the ranks cover the set exactly once (no padding)."""
    if dist.world_size == 1:
        return dataset
    return Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
