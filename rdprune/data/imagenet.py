"""ImageNet (or any dataset in the same layout) as a torchvision ImageFolder with train/ and val/."""
from __future__ import annotations

import copy
import os
from pathlib import Path

from PIL import Image
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from rdprune.data.preprocessing import RESNET, Preprocessing
from rdprune.errors import UserError

LAYOUT = "expected train/<class>/<image>.JPEG and val/<class>/<image>.JPEG, the same class folders in both"
INTERPOLATION_MODES = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "nearest": transforms.InterpolationMode.NEAREST,
}
"""torchvision's resampling mode for each ``Preprocessing.interpolation``."""


def train_transform(preprocessing: Preprocessing = RESNET) -> transforms.Compose:
    """Training augmentation: random resized crop of ``size`` (torchvision's default area and aspect
    ranges, the model's interpolation), horizontal flip, the model's mean and std."""
    p = preprocessing
    return transforms.Compose([
        transforms.RandomResizedCrop(p.size, interpolation=INTERPOLATION_MODES[p.interpolation]),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(p.mean, p.std),
    ])


def eval_transform(preprocessing: Preprocessing = RESNET) -> transforms.Compose:
    """Evaluation transform: resize to ``floor(size / crop_pct)`` (the shorter side for crop_mode
    "center", both sides for "squash"), centre crop ``size``, the model's mean and std.

    With ``RESNET`` this is the classic Resize(256), CenterCrop(224), bilinear, ImageNet mean/std.
    """
    p = preprocessing
    resize = p.resize_size if p.crop_mode == "center" else (p.resize_size, p.resize_size)
    return transforms.Compose([
        transforms.Resize(resize, interpolation=INTERPOLATION_MODES[p.interpolation]), transforms.CenterCrop(p.size),
        transforms.ToTensor(), transforms.Normalize(p.mean, p.std),
    ])


class CheckedImageFolder(ImageFolder):
    """An ImageFolder whose layout problems and undecodable files are one-line UserErrors.

    The layout is checked during ImageFolder's own directory scan (extensions only, no decoding,
    so it costs nothing extra on 1.28 M files); a truncated or corrupt image is found when it is
    decoded and reported with its path.
    """

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise UserError(f"image folder {directory} has no class folders; {LAYOUT}")
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples = []
        for name, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
            class_dir = os.path.join(directory, name)
            if not os.path.isdir(class_dir):
                raise UserError(f"image folder {directory} has no class folder {name!r}; {LAYOUT}")
            found = 0
            for dirpath, _, files in sorted(os.walk(class_dir, followlinks=True)):
                for file in sorted(files):
                    if file.startswith("."):
                        continue  # .DS_Store and friends are not data
                    path = os.path.join(dirpath, file)
                    if not file.lower().endswith(IMG_EXTENSIONS):
                        raise UserError(f"file {path} is not an image (allowed extensions: {', '.join(IMG_EXTENSIONS)})")
                    samples.append((path, index))
                    found += 1
            if not found:
                raise UserError(f"class folder {class_dir} has no images; every class needs at least one")
        return samples

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"image {self.samples[index][0]} cannot be decoded: {reason}") from exc


def imagenet_datasets(root: str | None, preprocessing: Preprocessing = RESNET) -> tuple[ImageFolder, ImageFolder, ImageFolder]:
    """(train, val, calibration pool) transformed for a model's ``preprocessing``; the pool is the
    train folder with the validation transform."""
    if root is None:
        raise UserError(f"data 'imagenet' needs data.root: the folder holding train/ and val/ ({LAYOUT})")
    base = Path(root)
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise UserError(f"data.root {str(root)!r} is not an ImageNet folder: missing {split}/; {LAYOUT}")
    train = CheckedImageFolder(str(base / "train"), transform=train_transform(preprocessing))
    val = CheckedImageFolder(str(base / "val"), transform=eval_transform(preprocessing))
    if val.classes != train.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise UserError(f"data.root {str(root)!r}: train/ and val/ have different class folders "
                        f"(only in train: {only_train}, only in val: {only_val}); {LAYOUT}")
    pool = copy.copy(train)
    pool.transform = eval_transform(preprocessing)
    return train, val, pool
