"""Build a dataset by name: the bundled mnist5k, local CIFAR-10 or ImageNet folders, or user code."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from rdprune.data.cifar10 import cifar10_datasets
from rdprune.data.imagenet import imagenet_datasets
from rdprune.data.mnist5k import mnist5k_datasets
from rdprune.data.preprocessing import RESNET, Preprocessing
from rdprune.errors import UserError
from rdprune.imports import IMPORT_FORM, accepts_keyword, load_callable
from rdprune.registry import DATASETS

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """Everything a run needs from a dataset."""

    train: Dataset
    """Training samples ``(image, label)``, with training augmentation."""
    test: Dataset
    """Held-out samples for top-1 and loss, without augmentation."""
    calibration_pool: Dataset
    """The training images without augmentation, indexed like ``train``; calibration draws from it."""
    input_shape: tuple[int, ...]
    """Shape of one input, e.g. (1, 28, 28)."""
    num_classes: int
    """Number of classes; labels are 0 .. num_classes - 1."""
    preprocessing: Preprocessing | None = None
    """How the images were resized, cropped and normalised (image folders; the DALI backend applies
    the same), or None for datasets that keep their own normalisation (mnist5k, cifar10, user code)."""


Loader = Callable[[str | None, Preprocessing | None], DataBundle]
_LOADERS: dict[str, Loader] = {}


def register(name: str) -> Callable[[Loader], Loader]:
    """Decorator: register ``loader(root, preprocessing) -> DataBundle`` under ``name``; a loader that
    has no use for the model's preprocessing ignores it and returns a bundle whose ``preprocessing`` is None."""
    def decorate(loader: Loader) -> Loader:
        if name not in DATASETS:  # rdprune's own are declared in rdprune.data.choices
            DATASETS.register(name, {"needs_root": False})
        _LOADERS[name] = loader
        return loader
    return decorate


@register("mnist5k")
def _mnist5k(root: str | None, preprocessing: Preprocessing | None) -> DataBundle:
    train, test, pool = mnist5k_datasets()
    return DataBundle(train, test, pool, (1, 28, 28), 10)


@register("cifar10")
def _cifar10(root: str | None, preprocessing: Preprocessing | None) -> DataBundle:
    train, test, pool = cifar10_datasets(root)
    return DataBundle(train, test, pool, (3, 32, 32), 10)


@register("imagenet")
def _imagenet(root: str | None, preprocessing: Preprocessing | None) -> DataBundle:
    p = preprocessing or RESNET
    train, test, pool = imagenet_datasets(root, p)
    return DataBundle(train, test, pool, p.input_shape, len(train.classes), p)


def __getattr__(name: str) -> object:
    """``DATASET_NAMES``, read on use: a plug-in the registry imports may import this module."""
    if name == "DATASET_NAMES":
        return list(DATASETS.names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_data(name: str, root: str | None = None, *, seed: int = 0,
               preprocessing: Preprocessing | None = None) -> DataBundle:
    """The datasets of ``name``: a registered name or ``package.module:callable``.

    The built-in datasets have fixed splits and ignore ``seed``; a user callable receives ``root``
    and ``seed`` as keywords when its signature accepts them. ``preprocessing`` (the model's input
    recipe) shapes the image-folder datasets (None: ``RESNET``); the tensor datasets and user
    callables keep their own normalisation, and a preprocessing given for them is ignored with
    one DEBUG line.
    """
    if name in _LOADERS:
        bundle = _LOADERS[name](root, preprocessing)
    elif ":" in name:
        bundle = _user_data(name, root, seed)
    else:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS.names())}, "
                        f"or give an import path '{IMPORT_FORM}'")
    if preprocessing is not None and bundle.preprocessing is None:
        log.debug("data %r keeps its own normalisation: the model's preprocessing (size %d, %s, crop_pct %g) is not applied",
                  name, preprocessing.size, preprocessing.interpolation, preprocessing.crop_pct)
    return bundle


def _user_data(spec: str, root: str | None, seed: int) -> DataBundle:
    factory = load_callable(spec, "data")
    kwargs = {k: v for k, v in (("root", root), ("seed", seed)) if accepts_keyword(factory, k)}
    result = factory(**kwargs)
    if isinstance(result, DataBundle):
        return result
    if not (isinstance(result, (tuple, list)) and len(result) == 2
            and all(isinstance(d, Dataset) for d in result)):
        raise UserError(f"data {spec!r} returned a {type(result).__name__}; expected (train, test) "
                        f"torch Datasets or a DataBundle")
    train, test = result
    if len(train) == 0:
        raise UserError(f"data {spec!r} returned an empty training set")
    sample = train[0]
    if not (isinstance(sample, (tuple, list)) and len(sample) >= 2 and isinstance(sample[0], torch.Tensor)):
        raise UserError(f"data {spec!r}: a training sample is a {type(sample).__name__}; expected (tensor, label)")
    return DataBundle(train, test, train, tuple(sample[0].shape), _count_classes(train))


def _count_classes(dataset: Dataset) -> int:
    """``len(dataset.classes)`` when present, else the largest label + 1."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return int(torch.as_tensor(targets).max()) + 1
