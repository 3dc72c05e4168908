"""Image datasets held in memory as uint8 tensors, normalised (and optionally augmented) per sample."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

Augment = Callable[[torch.Tensor], torch.Tensor]
"""Maps one float image in [0, 1], shaped (C, H, W), to an augmented image of the same shape."""


class TensorImages(Dataset):
    """``(image, label)`` pairs from a uint8 tensor (N, C, H, W) and int64 labels (N,).

    Images stay uint8 in memory (a quarter of float32) and are converted, augmented, then
    normalised with the per-channel ``mean``/``std`` when indexed.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                 mean: Sequence[float], std: Sequence[float], augment: Augment | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"expected uint8 images (N, C, H, W) and N labels, got {tuple(images.shape)} "
                             f"{images.dtype} and {len(labels)} labels")
        self.images = images
        self.targets = labels.to(torch.int64)
        self.classes = list(classes)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].to(torch.float32).div_(255.0)
        if self.augment is not None:
            image = self.augment(image)
        return (image - self.mean) / self.std, int(self.targets[index])

    def without_augmentation(self) -> TensorImages:
        """The same images and indexing, normalised but not augmented (for calibration)."""
        return TensorImages(self.images, self.targets, self.classes, self.mean.flatten().tolist(),
                            self.std.flatten().tolist(), augment=None)


def random_shift(pad: int) -> Augment:
    """Random translation by up to ``pad`` pixels each way, filling with black (a padded random crop)."""
    def shift(image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        padded = F.pad(image, (pad, pad, pad, pad))
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        return padded[:, top:top + height, left:left + width]
    return shift


def shift_and_flip(pad: int) -> Augment:
    """The standard CIFAR augmentation: padded random crop, then a horizontal flip half the time."""
    shift = random_shift(pad)

    def augment(image: torch.Tensor) -> torch.Tensor:
        image = shift(image)
        return image.flip(-1) if torch.rand(()) < 0.5 else image
    return augment
