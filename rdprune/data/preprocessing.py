"""How images become a model's input: size, resize interpolation, crop fraction, mean and std.

One ``Preprocessing`` drives both input pipelines (torchvision and DALI), so that a timm or
Hugging Face model is evaluated with its own data config, and ResNets with the classic one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation and training transforms of an image-folder dataset for one model.

    Evaluation resizes the shorter side to ``floor(size / crop_pct)`` and takes the central
    ``size`` x ``size`` crop (``crop_mode`` "center"), or resizes the whole image to
    ``size / crop_pct`` square and crops the centre ("squash"); training takes a random resized
    crop of ``size`` with a horizontal flip. Mean and std are in [0, 1] units, per channel.
    """

    size: int = 224
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    crop_pct: float = 0.875
    crop_mode: Literal["center", "squash"] = "center"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


RESNET = Preprocessing()
"""The classic ImageNet recipe (torchvision's ResNets): resize 256, centre crop 224, bilinear."""
