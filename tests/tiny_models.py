"""Tiny networks with awkward topology, shared by the core tests."""
import torch
from torch import nn


class Branchy(nn.Module):
    """Declared out of execution order, with a branch, a concat, a residual add, grouped and depthwise convs."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.head = nn.Linear(24, num_classes)  # declared first, runs last
        self.right = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 16, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        r = torch.relu(self.right(x)) + x
        left = self.depthwise(torch.relu(self.left(x)))
        y = torch.cat([left, r], dim=1).mean(dim=(2, 3))
        return self.head(y)


class NoPrunable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(x)
