"""Hugging Face image classifiers (``hf:<local folder or repo id>``), from local files only.

The model comes from a folder written by ``save_pretrained()`` or from a repo already in the local
Hugging Face cache; nothing is downloaded. ``model.kwargs`` override attributes of its config. The
transformers model is wrapped in :class:`HFImageClassifier`, whose forward returns the logits tensor
that rdprune's curves, training loop and export expect, and which also loads state_dicts saved from
the bare transformers model. Needs transformers >= 4.56 (``dtype=`` in ``from_pretrained``).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rdprune.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, RESNET, Preprocessing, crop_fraction
from rdprune.errors import UserError, one_line
from rdprune.models.builder_kwargs import merge_kwargs
from rdprune.models.choices import HF_PREFIX
from rdprune.models.offline import cached_hub_file, hf_hub_cache, hub_offline, require_extra

log = logging.getLogger(__name__)

PREFIX = HF_PREFIX
PROCESSOR_FILE = "preprocessor_config.json"
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
INNER = "model."  # where HFImageClassifier keeps the transformers model: the prefix of its state_dict keys
CONVNEXT_WARP = 384  # ConvNextImageProcessor warps to size x size from this shortest_edge on, ignoring crop_pct
_SHOWN = 8  # re-initialised weights named in the warning
_GREY_LEVELS = 1.0  # mean difference from the model's own processor past which the preprocessing is not its own


class HFImageClassifier(nn.Module):
    """A transformers image-classification model whose forward(x) returns the logits tensor [N, classes]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._register_load_state_dict_pre_hook(_accept_bare_keys, with_module=True)

    def adapt_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with this wrapper's keys: a state_dict of the bare transformers model (``vit.embeddings...``)
        gets the ``model.`` prefix; any other state_dict comes back as it is.

        ``load_state_dict`` does this by itself; ``rdprune.models.registry.load_checkpoint`` calls it
        before comparing the checkpoint's keys with the model's.
        """
        return {INNER + k: v for k, v in state.items()} if self._is_bare(state) else dict(state)

    def _is_bare(self, state: Mapping[str, Any]) -> bool:
        """Whether ``state`` has the inner model's keys: none of this wrapper's, some once prefixed with ``model.``."""
        own = self.state_dict().keys()
        return bool(state) and not any(k in own for k in state) and any(INNER + k in own for k in state)

    @property
    def config(self) -> Any:
        """The wrapped model's transformers config."""
        return self.model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _accept_bare_keys(module: HFImageClassifier, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """load_state_dict pre-hook: rename the bare transformers model's keys to the wrapper's, in place."""
    ours = {key[len(prefix):]: key for key in list(state_dict) if key.startswith(prefix)}
    if module._is_bare(ours):
        for rest, key in ours.items():
            state_dict[prefix + INNER + rest] = state_dict.pop(key)


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

    ``weights`` "DEFAULT" loads the saved weights, re-initialising those whose shapes the config
    changes or that the saved weights lack (a WARNING names them, apart from the classifier: an INFO
    line); None builds from the config with random weights; ``load_weights`` False validates without
    loading (a checkpoint follows). ``kwargs`` override config attributes; ``num_labels`` and (where
    the config has it) ``num_channels`` come from the data and may be repeated only with the same values.
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
        model, loading_info = _instantiate(transformers, spec, source, config, pretrained=weights is not None and load_weights)
    if weights is not None and not load_weights:
        log.info("model.checkpoint given: not loading the saved weights of %s", spec)
    elif loading_info is not None:
        _report_reinitialised(spec, model, loading_info, saved_labels, num_classes)
    return HFImageClassifier(model.float()).train()


def _report_reinitialised(spec: str, model: nn.Module, info: Mapping[str, Any], saved_labels: int, num_classes: int) -> None:
    """Say which weights ``from_pretrained`` initialised at random instead of loading them: those whose
    shapes the config changed (``mismatched_keys``) and those the saved weights lack (``missing_keys``).
    The classifier's are an INFO line (the expected head reset); every other is named in a WARNING."""
    head = _classifier_parameters(model)
    changed: dict[str, str] = {}
    for entry in info.get("mismatched_keys") or ():  # (key, saved shape, model shape); a set in 5.x, a list in 4.x
        key, *shapes = entry if isinstance(entry, (tuple, list)) else (entry,)
        changed[str(key)] = (f" (saved {list(shapes[0])}, model {list(shapes[1])})"
                             if len(shapes) == 2 and shapes[0] is not None and shapes[1] is not None else " (shape changed)")
    for key in info.get("missing_keys") or ():
        changed.setdefault(str(key), " (not saved)")
    if saved_labels != num_classes:
        log.info("the classifier of %s is re-initialised: its weights have %d labels, num_classes is %d",
                 spec, saved_labels, num_classes)
    elif head & set(changed):
        log.info("the classifier of %s is initialised at random: its saved weights do not have it", spec)
    others = sorted(k for k in changed if k not in head)
    if others:
        listed = ", ".join(k + changed[k] for k in others[:_SHOWN])
        more = f", and {len(others) - _SHOWN} more" if len(others) > _SHOWN else ""
        log.warning("model %r: %d weight%s initialised at random, not loaded from the saved weights (model.kwargs or "
                    "the data's channel count change their shapes, or the saved weights lack them): %s%s",
                    spec, len(others), "s are" if len(others) != 1 else " is", listed, more)


def _classifier_parameters(model: nn.Module) -> set[str]:
    """Names of the classifier's parameters: every parameter outside the backbone (``base_model_prefix``),
    as transformers lays out its ``*ForImageClassification`` models; for a model without that layout,
    those of the linear layers with one output per label."""
    prefix = getattr(model, "base_model_prefix", "")
    names = [name for name, _ in model.named_parameters()]
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return {name for name in names if not name.startswith(prefix + ".")}
    labels = model.config.num_labels
    return {f"{name}.{param}" if name else param
            for name, module in model.named_modules() if isinstance(module, nn.Linear) and module.out_features == labels
            for param, _ in module.named_parameters(recurse=False)}


def hf_preprocessing(path: str, kwargs: Mapping[str, Any] | None = None) -> Preprocessing | None:
    """The data config in the folder's or cached repo's ``preprocessor_config.json``; without one None (the
    dataset's default), or with an ``image_size`` override the default recipe at that size.

    A square ``crop_size`` after a resize of the shorter edge is a centre crop; after a resize to a
    fixed height and width, a squash; with a ``crop_pct`` too (PoolFormer) the shorter edge goes to
    ``int(size / crop_pct)`` first. ConvNeXt-style ``crop_pct`` with ``shortest_edge`` is a centre
    crop below 384 pixels and, from 384 on, a warp of the whole image to a square (a squash with
    crop_pct 1), as in transformers' ConvNextImageProcessor. Rescaling other than to [0, 1] (0..255
    inputs, EfficientNet's offset and ``include_top``) is folded into mean and std. An ``image_size``
    in ``kwargs`` (the config override that changes the model's input size) replaces the size,
    keeping the crop fraction.
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
    image_size = (kwargs or {}).get("image_size")
    if file is None:  # no recipe of its own: the dataset's default, at the size the override asks for
        return None if image_size is None else dataclasses.replace(RESNET, size=_image_size(spec, image_size))
    try:
        with open(file, encoding="utf-8") as stream:
            processor = json.load(stream)
    except (OSError, ValueError) as exc:
        raise UserError(f"model {spec!r}: cannot read {file} ({one_line(exc)})") from exc
    preprocessing = _processor_preprocessing(spec, processor)
    _check_reproduced(spec, os.path.dirname(file), preprocessing)
    if image_size is not None:
        preprocessing = dataclasses.replace(preprocessing, size=_image_size(spec, image_size))
    return preprocessing


def _check_reproduced(spec: str, folder: str, preprocessing: Preprocessing) -> None:
    """WARN when rdprune's image pipeline does not reproduce the model's own processor on test images.

    Processors may resize, pad or reorder channels in ways a ``Preprocessing`` cannot say (LeViT-
    or PoolFormer-like rules are modelled, ``longest_edge`` padding or BGR order are not): the
    processor itself is run on a landscape and a portrait image and compared with the eval
    transform, so an evaluation that would not match the model card is named, not silent.
    """
    from rdprune.data.imagenet import eval_transform
    transformers = require_extra("transformers", spec, "hf")
    try:
        with hub_offline():
            processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        images = [_test_image(width, height) for width, height in ((320, 240), (200, 300))]
        theirs = [processor(image, return_tensors="pt")["pixel_values"][0] for image in images]
    except Exception as exc:  # any failure of a third-party processor only skips this check
        log.debug("%s: its image processor could not be run to check rdprune's preprocessing (%s)", spec, one_line(exc))
        return
    ours = [eval_transform(preprocessing)(image) for image in images]
    scale = torch.tensor(preprocessing.std).view(3, 1, 1) * 255  # normalised units -> grey levels
    for mine, reference in zip(ours, theirs):
        if mine.shape != reference.shape:
            found = f"its processor gives {list(reference.shape)}, rdprune's pipeline {list(mine.shape)}"
        elif ((mine - reference).abs() * scale).mean() > _GREY_LEVELS:
            found = f"a mean difference of {float(((mine - reference).abs() * scale).mean()):.1f} grey levels"
        else:
            continue
        log.warning("model %r: rdprune's image pipeline does not reproduce its %s on a test image (%s): evaluation of its "
                    "saved weights will not match the model card", spec, type(processor).__name__, found)
        return


def _test_image(width: int, height: int) -> Any:
    """A deterministic, smooth RGB test image: random colours upsampled bicubically."""
    from PIL import Image
    colours = torch.rand(height // 8, width // 8, 3, generator=torch.Generator().manual_seed(0)) * 255
    return Image.fromarray(colours.to(torch.uint8).numpy()).resize((width, height), Image.BICUBIC)


def _image_size(spec: str, value: Any) -> int:
    """The side of a square ``image_size`` from model.kwargs (an int or a [height, width] pair), or a UserError."""
    sides = list(value) if isinstance(value, (list, tuple)) else [value]
    if (len(sides) in (1, 2) and all(isinstance(side, int) and not isinstance(side, bool) for side in sides)
            and len(set(sides)) == 1 and sides[0] > 0):
        return sides[0]
    raise UserError(f"model {spec!r}: model.kwargs image_size must be a positive int (or a square [height, width]) for "
                    f"rdprune's square image data, not {value!r}")


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


def _instantiate(transformers: Any, spec: str, source: str, config: Any,
                 pretrained: bool) -> tuple[nn.Module, Mapping[str, Any] | None]:
    """The model, and with ``pretrained`` from_pretrained's loading info (missing and mismatched keys)."""
    auto = transformers.AutoModelForImageClassification
    try:
        if not pretrained:
            return auto.from_config(config, dtype=torch.float32), None
        return auto.from_pretrained(source, config=config, local_files_only=True, ignore_mismatched_sizes=True,
                                    cache_dir=hf_hub_cache(), dtype=torch.float32, output_loading_info=True)
    except OSError as exc:  # no weight file in the folder or the cache
        raise UserError(f"model {spec!r}: cannot load its saved weights ({one_line(exc)}); set model.weights to null "
                        f"for random weights, or model.checkpoint to a local state_dict") from exc
    except (ValueError, TypeError, RuntimeError) as exc:  # no image classifier for this config, or overrides that do not fit
        raise UserError(f"model {spec!r}: transformers cannot build an image classifier from its "
                        f"{type(config).__name__} ({one_line(exc)})") from exc


def _processor_preprocessing(spec: str, processor: Mapping[str, Any]) -> Preprocessing:
    """The ``Preprocessing`` equal to an image processor's resize, crop, rescale and normalisation."""
    resample = processor.get("resample", 2)
    if resample not in _PIL_RESAMPLE:
        log.info("%s: PIL resample %r is not supported, using bicubic", spec, resample)
    try:
        final, mode, crop_pct = _geometry(spec, processor)
        mean, std = _pixel_statistics(processor)
        # A crop larger than the resized image (MobileViT pads it) is taken from the image resized to the crop:
        # not the processor's output, which the reproduction check then says.
        return Preprocessing(size=int(final), interpolation=_PIL_RESAMPLE.get(resample, "bicubic"),
                             crop_pct=min(float(crop_pct), 1.0), crop_mode=mode, mean=mean, std=std)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise UserError(f"model {spec!r}: its {PROCESSOR_FILE} does not fit rdprune's image pipeline ({one_line(exc)})") from exc


def _geometry(spec: str, processor: Mapping[str, Any]) -> tuple[int, str, float]:
    """The processor's final side, crop mode and crop fraction (``Preprocessing``'s size, crop_mode, crop_pct)."""
    size = processor.get("size", 224)
    if isinstance(size, int):  # old processors: an int is the shorter edge for ConvNeXt-style crop_pct, else a square
        size = {"shortest_edge": size} if "crop_pct" in processor else {"height": size, "width": size}
    shortest = size.get("shortest_edge")
    resized = shortest if shortest is not None else _side(spec, size)
    kind = _processor_kind(processor)
    convnext = kind.startswith("ConvNext") or not kind  # untyped old files with crop_pct are ConvNeXt's
    crop = processor.get("crop_size") if processor.get("do_center_crop", "crop_size" in processor) else None
    if crop is not None:
        final = crop if isinstance(crop, int) else _side(spec, crop)
        if processor.get("crop_pct") is not None:  # PoolFormer: the shorter edge goes to int(size / crop_pct), then the crop
            resized, shortest = int(resized / float(processor["crop_pct"])), resized
        elif kind.startswith("Levit") and shortest is not None:  # LeViT: the shorter edge goes to int(256 / 224 * size)
            resized = int((256 / 224) * shortest)
        mode, crop_pct = ("center" if shortest is not None else "squash"), crop_fraction(final, resized)
    elif convnext and shortest is not None and "crop_pct" in processor and shortest >= CONVNEXT_WARP:  # a warp, no crop
        final, mode, crop_pct = shortest, "squash", 1.0
    elif convnext and shortest is not None and processor.get("crop_pct") is not None:  # ConvNeXt below 384: resize, crop
        final, mode, crop_pct = shortest, "center", float(processor["crop_pct"])
    else:  # a plain resize: to a square, or of the shorter edge (taken here as a full centre crop)
        final, mode, crop_pct = resized, ("center" if shortest is not None else "squash"), 1.0
    return final, mode, crop_pct


def _pixel_statistics(processor: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std in [0, 1] pixel units equal to the processor's rescale and normalisation.

    The processor feeds the model ``(f * x - offset - mean) / std`` for pixels ``x`` in [0, 1], where
    ``f`` is 255 times ``rescale_factor`` (255 with ``do_rescale`` false: models that take 0..255),
    ``offset`` 1 with EfficientNet's ``rescale_offset``, and mean 0, std 1 without ``do_normalize``.
    That is ``(x - (offset + mean) / f) / (std / f)``. EfficientNet's ``include_top`` (its default)
    divides once more by ``image_std``, whether or not it normalised.
    """
    rescale = processor.get("do_rescale", True)
    factor = 255.0 * float(processor.get("rescale_factor", 1 / 255)) if rescale else 255.0
    offset = 1.0 if rescale and processor.get("rescale_offset", False) else 0.0
    image_std = _rgb(processor.get("image_std", IMAGENET_STD))
    normalize = processor.get("do_normalize", True)
    mean = _rgb(processor.get("image_mean", IMAGENET_MEAN)) if normalize else (0.0,) * 3
    std = image_std if normalize else (1.0,) * 3
    if processor.get("include_top", _processor_kind(processor).startswith("EfficientNet")):
        std = tuple(s * t for s, t in zip(std, image_std))
    return tuple((offset + m) / factor for m in mean), tuple(s / factor for s in std)


def _processor_kind(processor: Mapping[str, Any]) -> str:
    """The processor's class name as its file records it ("" in old untyped files)."""
    return str(processor.get("image_processor_type") or processor.get("feature_extractor_type") or "")


def _side(spec: str, size: Mapping[str, Any]) -> int:
    height, width = size.get("height"), size.get("width")
    if height is None or height != width:
        raise UserError(f"model {spec!r}: its preprocessor size {dict(size)} is not square; rdprune's image data is square")
    return int(height)


def _rgb(values: Any) -> tuple[float, ...]:
    """Per-channel statistics for the RGB images rdprune's pipelines produce: one value (a grey model's) is repeated."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return tuple(float(v) for v in (values * 3 if len(values) == 1 else values))
