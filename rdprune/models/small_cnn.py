"""A small CNN for 28x28 digits: quick to pretrain on a CPU, with five prunable layers of varied size."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three 3x3 convs (16, 32, 64 channels), each followed by ReLU and 2x2 max-pooling, then two linears.

    On 1x28x28 inputs the prunable weights are 144 / 4,608 / 18,432 / 73,728 / 1,280 (for ten
    classes): a tiny first layer, two mid-size convs, a large fully connected layer and a small head,
    which gives a layer-adaptive method something to allocate. Other input sizes work too: the first
    linear layer is sized from ``input_shape``.
    """

    def __init__(self, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28)):
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        flat = 64 * (height // 8) * (width // 8)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
