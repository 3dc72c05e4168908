"""VGG-16 with BatchNorm for 32x32 CIFAR images, as in the CIFAR experiments of LAMP and RD pruning."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# 13 convs; "M" is a 2x2 max-pool. Five pools take 32x32 down to 1x1, so 512 features reach the head.
# The pools round up (ceil_mode), which changes nothing for 32x32 but takes 28x28 digits to 1x1 too
# (28, 14, 7, 4, 2, 1) instead of failing at the last pool.
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGGCifar(nn.Module):
    """13 conv-BN-ReLU blocks and a single ``Linear(512, num_classes)`` classifier (14.7 M weights).

    The single linear head (instead of ImageNet VGG's three 4096-wide layers) is the usual CIFAR
    variant; its weight count matches the 14.7 M reported for VGG-16 in the CIFAR pruning papers.
    ``in_channels`` is the input's channel count (3 for RGB, 1 for grayscale digits); a global average
    pool before the head (a no-op on the 1x1 maps of 32x32 inputs) lets larger images through too.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item),
                           nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def vgg16_cifar(num_classes: int = 10, in_channels: int = 3) -> VGGCifar:
    """VGG-16 (BatchNorm, 13 convs, one linear head) for ``in_channels`` x 32 x 32 inputs."""
    return VGGCifar(num_classes, in_channels)
