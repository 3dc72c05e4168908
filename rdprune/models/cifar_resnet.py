"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20/32/44/56 with parameter-free shortcuts.

A 3x3 stem conv with 16 channels (from ``in_channels`` input channels, 3 for RGB), then three stages
of ``n`` basic blocks with 16, 32 and 64 channels (the first block of stages 2 and 3 halves the
resolution), global average pooling and a linear classifier: ``6n + 2`` weighted layers. Shortcuts
are identities; where the shape changes they subsample by 2 and pad the new channels with zeros
("option A"), so they add no weights.
Prunable layers: ``6n + 1`` convolutions and the classifier (ResNet-32: 31 + 1 = 32).
With ``shortcut="projection"`` ("option B") the shape-changing shortcuts are a strided 1x1 conv with
BatchNorm instead: two more convolutions, and a graph that channel pruning can analyse (a
zero-padding shortcut ties channel counts in a way no dependency graph follows).
Global average pooling lets other image sizes through too, e.g. 1x28x28 digits with ``in_channels=1``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut: take every other pixel and zero-pad the added channels."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a ReLU between and after the residual sum."""

    def __init__(self, in_channels: int, channels: int, stride: int, shortcut: str = "pad"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        changes_shape = stride != 1 or in_channels != channels
        if not changes_shape:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "projection":
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels))
        else:
            self.shortcut = ZeroPadShortcut(channels - in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``blocks_per_stage`` basic blocks in each of three stages.

    ``in_channels`` is the input's channel count (3 for RGB, 1 for grayscale, more for multispectral
    images); it changes only the stem conv's weight shape. ``shortcut``: ``"pad"`` (option A) or
    ``"projection"`` (option B).
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3, shortcut: str = "pad"):
        super().__init__()
        if shortcut not in ("pad", "projection"):
            raise ValueError(f"shortcut must be 'pad' or 'projection', got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_channels = [], 16
        for channels, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_channels, channels, stride if i == 0 else 1, shortcut))
                in_channels = channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3, shortcut: str = "pad") -> CifarResNet:
    return CifarResNet(3, num_classes, in_channels, shortcut)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(5, num_classes, in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(7, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(9, num_classes, in_channels)
