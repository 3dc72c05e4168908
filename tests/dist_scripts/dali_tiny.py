"""A tiny CNN for 224-pixel images, so an end-to-end DALI run stays quick on CPU (import path dali_tiny:tiny)."""
from torch import nn


def tiny(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 7, stride=4), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
