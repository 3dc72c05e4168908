"""Two small BatchNorm networks for channel-pruning experiments on 28x28 digits, quick to train on a CPU.

- :class:`PlainBNCNN`: VGG-style, six 3x3 conv + BatchNorm + ReLU layers (16, 16, 32, 32, 64, 64
  channels, 2x2 max-pooling after every second one), global average pooling and a linear classifier;
  no residuals, so every channel group is one layer's output.
- :class:`MobileNetV2Digits`: MobileNetV2-style inverted residual blocks (1x1 expansion, 3x3 depthwise,
  1x1 projection, each with BatchNorm; a residual where the shape allows), the case of depthwise
  convolutions and coupled residual streams.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True) if groups > 1 or kernel == 1 else nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PlainBNCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        widths = (16, 16, 32, 32, 64, 64)
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            layers.append(_conv_bn(cin, w))
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.block = nn.Sequential(_conv_bn(cin, hidden, 1), _conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                   _conv_bn(hidden, cout, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV2Digits(nn.Module):
    """Stem 3x3 conv (16), inverted residual stages (t, c, n, s) = (1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2),
    (4, 64, 2, 1), a 1x1 conv to 128, global pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        blocks: list[nn.Module] = [_conv_bn(in_channels, 16)]
        cin = 16
        for expand, cout, repeats, stride in ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 1)):
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        blocks.append(_conv_bn(cin, 128, 1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))
