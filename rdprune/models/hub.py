"""Models from other libraries by prefixed name: ``timm:<model name>`` and ``hf:<folder or repo id>``.

The prefixes are reserved: a name that starts with one of them is never read as an import path
``package.module:callable``. Both families build from local files only (see ``rdprune.models.offline``)
and bring their own preprocessing (:func:`model_preprocessing`), which image-folder data then uses.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from rdprune.data.preprocessing import Preprocessing
from rdprune.models import hf_models, timm_models
from rdprune.models.choices import HF_PREFIX, TIMM_PREFIX

HUB_PREFIXES = (TIMM_PREFIX, HF_PREFIX)


def is_hub_name(name: str) -> bool:
    """Whether ``name`` names a timm or Hugging Face model (starts with a reserved prefix)."""
    return name.startswith(HUB_PREFIXES)


def input_size_key(name: str) -> str | None:
    """The model.kwargs key that sets a timm (img_size) or Hugging Face (image_size) model's input size; None otherwise."""
    return "img_size" if name.startswith(TIMM_PREFIX) else "image_size" if name.startswith(HF_PREFIX) else None


def build_hub_model(
    name: str,
    num_classes: int,
    channels: int,
    *,
    weights: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    drop_path_rate: float | None = None,
    load_weights: bool = True,
) -> nn.Module:
    """Build the timm or Hugging Face model ``name`` (with its prefix), in training mode; see the family's builder."""
    options = dict(weights=weights, kwargs=kwargs, drop_path_rate=drop_path_rate, load_weights=load_weights)
    if name.startswith(TIMM_PREFIX):
        return timm_models.build_timm_model(name[len(TIMM_PREFIX):], num_classes, channels, **options)
    if name.startswith(HF_PREFIX):
        return hf_models.build_hf_model(name[len(HF_PREFIX):], num_classes, channels, **options)
    raise ValueError(f"{name!r} is not a timm: or hf: model name")


def model_preprocessing(name: str, kwargs: Mapping[str, Any] | None = None, *, weights: str | None = None) -> Preprocessing | None:
    """The preprocessing model ``name`` was trained with, or None to keep the dataset's default.

    timm models: their pretrained cfg (the tag of the name, else of ``weights`` when that is a tag,
    else timm's default), with an ``img_size`` in ``kwargs`` as the size. Hugging Face models: their
    ``preprocessor_config.json`` (None without one), with an ``image_size`` in ``kwargs`` as the size.
    Every other model: None.
    """
    if name.startswith(TIMM_PREFIX):
        return timm_models.timm_preprocessing(name[len(TIMM_PREFIX):], kwargs, weights)
    if name.startswith(HF_PREFIX):
        return hf_models.hf_preprocessing(name[len(HF_PREFIX):], kwargs)
    return None
