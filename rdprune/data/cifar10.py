"""CIFAR-10 from the standard ``cifar-10-batches-py`` folder (the python pickles), held in memory."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from rdprune.data.tensors import TensorImages, shift_and_flip
from rdprune.errors import UserError

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
FOLDER = "cifar-10-batches-py"

# The pickles hold numpy arrays and nothing else; refusing every other global keeps a tampered
# file from running code, in the spirit of torch.load(weights_only=True).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2, the protocol of the official files
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


def cifar10_folder(root: str | None) -> Path:
    """The ``cifar-10-batches-py`` folder given as ``root`` itself or as its parent."""
    if root is None:
        raise UserError(f"data 'cifar10' needs data.root: the folder holding {FOLDER}/")
    base = Path(root)
    folder = base if not (base / FOLDER).is_dir() else base / FOLDER
    missing = [f for f in (*TRAIN_FILES, TEST_FILE) if not (folder / f).is_file()]
    if missing:
        raise UserError(
            f"data.root {str(root)!r} is not a CIFAR-10 folder: expected {FOLDER}/ with data_batch_1..5 "
            f"and test_batch (the python version from https://www.cs.toronto.edu/~kriz/cifar.html); "
            f"missing: {', '.join(missing)}"
        )
    return folder


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickle as uint8 images (N, 3, 32, 32) and int64 labels; UserError naming a bad file."""
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:  # truncated, not a pickle, wrong keys, wrong types: all "not readable"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"CIFAR-10 file {path} is not a readable CIFAR python pickle: {reason}") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise UserError(f"CIFAR-10 file {path} holds data of shape {list(data.shape)} and {len(labels)} labels; "
                        f"expected [N, 3072] and N labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise UserError(f"CIFAR-10 file {path} has labels outside 0..9")
    return torch.from_numpy(data.copy()).view(-1, 3, 32, 32), torch.from_numpy(labels)


def cifar10_datasets(root: str | None) -> tuple[TensorImages, TensorImages, TensorImages]:
    """(train, test, calibration pool); train has random crop (pad 4) and horizontal flip."""
    folder = cifar10_folder(root)
    parts = [read_batch(folder / name) for name in TRAIN_FILES]
    images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    test_images, test_labels = read_batch(folder / TEST_FILE)
    train = TensorImages(images, labels, CLASSES, MEAN, STD, augment=shift_and_flip(4))
    test = TensorImages(test_images, test_labels, CLASSES, MEAN, STD)
    return train, test, train.without_augmentation()
