"""How images become a model's input: size, resize interpolation, crop fraction, mean and std.

One ``Preprocessing`` drives both input pipelines (torchvision and DALI), so that a timm or
Hugging Face model is evaluated with its own data config, and ResNets with the classic one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
CROP_MODES = ("center", "squash")


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation and training transforms of an image-folder dataset for one model.

    Evaluation resizes the shorter side to ``floor(size / crop_pct)`` and takes the central
    ``size`` x ``size`` crop (``crop_mode`` "center"), or resizes the whole image to
    ``size / crop_pct`` square and crops the centre ("squash"); training takes a random resized
    crop of ``size`` with a horizontal flip. Mean and std are in [0, 1] units, per channel.

    Values are checked on construction (ValueError): the pipelines produce RGB images, so mean
    and std have 3 entries (any sequence is stored as a tuple of floats); ``crop_pct`` is in (0, 1],
    so the resized image always covers the crop and no padding is ever needed.
    """

    size: int = 224
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    crop_pct: float = 0.875
    crop_mode: Literal["center", "squash"] = "center"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, Integral) or self.size < 1:
            raise ValueError(f"Preprocessing.size must be a positive int, got {self.size!r}")
        object.__setattr__(self, "size", int(self.size))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"Preprocessing.interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, Real) or not 0 < self.crop_pct <= 1:
            raise ValueError(f"Preprocessing.crop_pct must be a number in (0, 1], got {self.crop_pct!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"Preprocessing.crop_mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}")
        object.__setattr__(self, "mean", _channels("mean", self.mean, low_open=False))
        object.__setattr__(self, "std", _channels("std", self.std, low_open=True))

    @property
    def resize_size(self) -> int:
        """Side the image is resized to before the evaluation crop: ``floor(size / crop_pct)`` (timm's rule)."""
        return math.floor(self.size / self.crop_pct)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one preprocessed image: (3, size, size)."""
        return (3, self.size, self.size)


def crop_fraction(crop: int, resized: int) -> float:
    """The ``crop_pct`` for a ``crop`` x ``crop`` centre crop of an image resized to ``resized``: ``crop / resized``,
    moved by the last bits where needed so that ``Preprocessing.resize_size`` floors back to ``resized``."""
    fraction = crop / resized
    while math.floor(crop / fraction) < resized:
        fraction = math.nextafter(fraction, 0.0)
    while math.floor(crop / fraction) > resized:
        fraction = math.nextafter(fraction, 1.0)
    return fraction


def _channels(name: str, values: object, low_open: bool) -> tuple[float, ...]:
    """``values`` as a tuple of 3 floats in [0, 1] ((0, 1] when ``low_open``), else a ValueError."""
    try:
        floats = tuple(float(v) for v in values if not isinstance(v, bool))  # type: ignore[union-attr]
        ok = len(floats) == len(values) == 3  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ok = False
    if ok and all((0 < v if low_open else 0 <= v) and v <= 1 for v in floats):
        return floats
    interval = "(0, 1]" if low_open else "[0, 1]"
    raise ValueError(f"Preprocessing.{name} must be 3 numbers (R, G, B) in {interval} (pixel values scaled to "
                     f"[0, 1], not 0..255); got {values!r}")


RESNET = Preprocessing()
"""The classic ImageNet recipe (torchvision's ResNets): resize 256, centre crop 224, bilinear."""
