"""Hugging Face image classifiers (``hf:<local folder or repo id>``), from local files only.

The model comes from a folder written by ``save_pretrained()`` or from a repo already in the local
Hugging Face cache; nothing is downloaded. ``model.kwargs`` override attributes of its config. The
transformers model is wrapped in :class:`HFImageClassifier`, whose forward returns the logits tensor
that rdprune's curves, training loop and export expect.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rdprune.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from rdprune.errors import UserError, one_line
from rdprune.models.builder_kwargs import merge_kwargs
from rdprune.models.offline import cached_hub_file, hf_hub_cache, hub_offline, require_extra

log = logging.getLogger(__name__)

PREFIX = "hf:"
PROCESSOR_FILE = "preprocessor_config.json"
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class HFImageClassifier(nn.Module):
    """A transformers image-classification model whose forward(x) returns the logits tensor [N, classes]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        """The wrapped model's transformers config."""
        return self.model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def build_hf_model(
    path: str,
    num_classes: int,
    channels: int,
    *,
    weights: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    drop_path_rate: float | None = None,
    load_weights: bool = True,
) -> HFImageClassifier:
    """Build the image classifier in folder or cached repo ``path`` (without the prefix), in fp32 and training mode.

    ``weights`` "DEFAULT" loads the saved weights (re-initialising those whose shapes the config
    changes, such as a classifier for another class count); None builds from the config with random
    weights; ``load_weights`` False validates without loading (a checkpoint follows). ``kwargs``
    override config attributes; ``num_labels`` and (where the config has it) ``num_channels`` come from
    the data and may be repeated only with the same values.
    """
    spec = PREFIX + path
    if weights not in (None, "DEFAULT"):
        raise UserError(f"model {spec!r}: model.weights is DEFAULT (the saved weights) or null (random init) "
                        f"for hf: models, not {weights!r}")
    transformers = require_extra("transformers", spec, "hf")
    source = _locate(spec, path)
    with hub_offline():
        try:
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=True, cache_dir=hf_hub_cache())
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"model {spec!r}: cannot read its config.json ({one_line(exc)})") from exc
        saved_labels = config.num_labels
        _configure(spec, config, num_classes, channels, kwargs, drop_path_rate)
        model = _instantiate(transformers, spec, source, config, pretrained=weights is not None and load_weights)
    if weights is not None and not load_weights:
        log.info("model.checkpoint given: not loading the saved weights of %s", spec)
    elif weights is not None and saved_labels != num_classes:
        log.info("the classifier of %s is re-initialised: its weights have %d labels, num_classes is %d",
                 spec, saved_labels, num_classes)
    return HFImageClassifier(model.float()).train()


def hf_preprocessing(path: str) -> Preprocessing | None:
    """The data config in the folder's or cached repo's ``preprocessor_config.json``, or None without one.

    A square ``crop_size`` after a resize of the shorter edge is a centre crop; after a resize to a
    fixed height and width, a squash. ConvNeXt-style ``crop_pct`` with ``shortest_edge`` is a centre
    crop below 384 pixels and a plain resize from 384 on, as in transformers.
    """
    spec = PREFIX + path
    folder = os.path.expanduser(path)
    if os.path.isdir(folder):
        file = os.path.join(folder, PROCESSOR_FILE)
        file = file if os.path.isfile(file) else None
    else:
        require_extra("huggingface_hub", spec, "hf")
        _locate(spec, path)
        file = cached_hub_file(path, PROCESSOR_FILE)
    if file is None:
        return None
    try:
        with open(file, encoding="utf-8") as stream:
            processor = json.load(stream)
    except (OSError, ValueError) as exc:
        raise UserError(f"model {spec!r}: cannot read {file} ({one_line(exc)})") from exc
    return _processor_preprocessing(spec, processor)


def _locate(spec: str, path: str) -> str:
    """The local folder or the cached repo id that ``path`` names, or a one-line UserError."""
    if not path:
        raise UserError(f"model {spec!r}: give a folder or a Hugging Face repo id after '{PREFIX}'")
    folder = os.path.expanduser(path)
    if os.path.isdir(folder):
        return folder
    if cached_hub_file(path, "config.json") is not None:
        return path
    advice = "give a folder written by save_pretrained()"
    if not _looks_like_folder(path):
        advice += f", or run from_pretrained({path!r}) on a machine with network and copy its cache (HF_HOME) here"
    raise UserError(
        f"model {spec!r}: {path!r} is neither a local folder nor in the local Hugging Face cache ({hf_hub_cache()}); {advice}"
    )


def _looks_like_folder(path: str) -> bool:
    """Whether ``path`` can only be a file-system path: a repo id is 'name' or 'namespace/name'."""
    return path.startswith((".", "~", os.sep, "/")) or path.count("/") > 1 or (os.sep != "/" and os.sep in path)


def _configure(spec: str, config: Any, num_classes: int, channels: int, kwargs: Mapping[str, Any] | None,
               drop_path_rate: float | None) -> None:
    """Apply the user's overrides and the data's class and channel counts to ``config``, checking every key."""
    automatic: dict[str, Any] = {"num_labels": num_classes}
    if hasattr(config, "num_channels"):
        automatic["num_channels"] = channels
    merged = merge_kwargs(spec, kwargs, automatic)
    if drop_path_rate is not None:
        if not hasattr(config, "drop_path_rate"):
            raise UserError(f"model {spec!r}: its {type(config).__name__} has no drop_path_rate; remove model.drop_path_rate")
        merged = merge_kwargs(spec, merged, {"drop_path_rate": drop_path_rate}, source="model.drop_path_rate")
    for key, value in merged.items():
        if not hasattr(config, key):
            near = difflib.get_close_matches(key, sorted(config.to_dict()), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UserError(f"model {spec!r}: model.kwargs key {key!r} is not an attribute of its {type(config).__name__}{hint}")
        setattr(config, key, value)


def _instantiate(transformers: Any, spec: str, source: str, config: Any, pretrained: bool) -> nn.Module:
    auto = transformers.AutoModelForImageClassification
    try:
        if not pretrained:
            return auto.from_config(config, dtype=torch.float32)
        return auto.from_pretrained(source, config=config, local_files_only=True, ignore_mismatched_sizes=True,
                                    cache_dir=hf_hub_cache(), dtype=torch.float32)
    except OSError as exc:  # no weight file in the folder or the cache
        raise UserError(f"model {spec!r}: cannot load its saved weights ({one_line(exc)}); set model.weights to null "
                        f"for random weights, or model.checkpoint to a local state_dict") from exc
    except (ValueError, TypeError, RuntimeError) as exc:  # no image classifier for this config, or overrides that do not fit
        raise UserError(f"model {spec!r}: transformers cannot build an image classifier from its "
                        f"{type(config).__name__} ({one_line(exc)})") from exc


def _processor_preprocessing(spec: str, processor: Mapping[str, Any]) -> Preprocessing:
    size = processor.get("size", 224)
    if isinstance(size, int):  # old processors: an int is the shorter edge for ConvNeXt-style crop_pct, else a square
        size = {"shortest_edge": size} if "crop_pct" in processor else {"height": size, "width": size}
    shortest = size.get("shortest_edge")
    resized = shortest if shortest is not None else _side(spec, size)
    crop = processor.get("crop_size") if processor.get("do_center_crop", "crop_size" in processor) else None
    if crop is not None:
        final = crop if isinstance(crop, int) else _side(spec, crop)
        mode, crop_pct = ("center" if shortest is not None else "squash"), final / resized
    elif shortest is not None and processor.get("crop_pct") is not None and shortest < 384:
        final, mode, crop_pct = shortest, "center", float(processor["crop_pct"])
    else:  # a plain resize: to a square, or of the shorter edge (taken here as a full centre crop)
        final, mode, crop_pct = resized, ("center" if shortest is not None else "squash"), 1.0
    resample = processor.get("resample", 2)
    if resample not in _PIL_RESAMPLE:
        log.info("%s: PIL resample %r is not supported, using bicubic", spec, resample)
    normalize = processor.get("do_normalize", True)
    try:
        return Preprocessing(
            size=int(final),
            interpolation=_PIL_RESAMPLE.get(resample, "bicubic"),
            crop_pct=float(crop_pct),
            crop_mode=mode,
            mean=_rgb(processor.get("image_mean", IMAGENET_MEAN)) if normalize else (0.0, 0.0, 0.0),
            std=_rgb(processor.get("image_std", IMAGENET_STD)) if normalize else (1.0, 1.0, 1.0),
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"model {spec!r}: its {PROCESSOR_FILE} does not fit rdprune's image pipeline ({one_line(exc)})") from exc


def _side(spec: str, size: Mapping[str, Any]) -> int:
    height, width = size.get("height"), size.get("width")
    if height is None or height != width:
        raise UserError(f"model {spec!r}: its preprocessor size {dict(size)} is not square; rdprune's image data is square")
    return int(height)


def _rgb(values: Any) -> tuple[float, ...]:
    """Per-channel statistics for the RGB images rdprune's pipelines produce: one value (a grey model's) is repeated."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return tuple(float(v) for v in (values * 3 if len(values) == 1 else values))
