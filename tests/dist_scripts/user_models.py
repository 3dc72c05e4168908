"""Models given to the pipeline as ``model.name=dist_scripts.user_models:<factory>`` (tests/ on PYTHONPATH)."""
import os

import torch
from torch import nn


class BatchNormCNN(nn.Module):
    """Two convs with BatchNorm and a linear head for 1x28x28 digits: buffers that training updates."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def batchnorm_cnn(num_classes: int) -> nn.Module:
    return BatchNormCNN(num_classes)


class FailsOnRankOne(BatchNormCNN):
    """Raises in every forward of a real batch on rank 1 only (the one-sample dry run passes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.environ.get("RANK") == "1" and x.shape[0] > 1:
            raise RuntimeError("deliberate failure in the user's forward")
        return super().forward(x)


def fails_on_rank_one(num_classes: int) -> nn.Module:
    return FailsOnRankOne(num_classes)
