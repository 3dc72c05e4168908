"""VGG-16 with BatchNorm for 32x32 CIFAR images, as in the CIFAR experiments of LAMP and RD pruning."""
from __future__ import annotations

import torch
from torch import nn

# 13 convs; "M" is a 2x2 max-pool. Five pools take 32x32 down to 1x1, so 512 features reach the head.
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGGCifar(nn.Module):
    """13 conv-BN-ReLU blocks and a single ``Linear(512, num_classes)`` classifier (14.7 M weights).

    The single linear head (instead of ImageNet VGG's three 4096-wide layers) is the usual CIFAR
    variant; its weight count matches the 14.7 M reported for VGG-16 in the CIFAR pruning papers.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
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
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16_cifar(num_classes: int = 10) -> VGGCifar:
    """VGG-16 (BatchNorm, 13 convs, one linear head) for 3x32x32 inputs."""
    return VGGCifar(num_classes)
