"""timm models by name (``timm:<name>`` or ``timm:<name>.<pretrained tag>``), with weights from the local cache only.

``timm.create_model`` builds the network with rdprune's class and channel counts and the user's
``model.kwargs``. Pretrained weights are looked up in the local caches (the Hugging Face hub cache,
then torch.hub's) and handed to timm as a local file, so no request leaves the machine; weights that
are not cached are a one-line ``UserError`` that says how to get them.
"""
from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from rdprune.data.preprocessing import CROP_MODES, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocessing
from rdprune.errors import UserError, one_line
from rdprune.models.builder_kwargs import call_with_kwargs, merge_kwargs
from rdprune.models.choices import TIMM_PREFIX
from rdprune.models.offline import cached_hub_file, hf_hub_cache, hub_offline, require_extra

log = logging.getLogger(__name__)

PREFIX = TIMM_PREFIX


def build_timm_model(
    name: str,
    num_classes: int,
    channels: int,
    *,
    weights: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    drop_path_rate: float | None = None,
    load_weights: bool = True,
) -> nn.Module:
    """Build timm model ``name`` (without the prefix) for ``num_classes`` classes and ``channels`` input channels.

    ``weights`` is None (random init), "DEFAULT" (the name's tag, else timm's default tag) or a
    pretrained tag; ``load_weights`` False validates them without loading (a checkpoint follows).
    ``num_classes`` and ``in_chans`` come from the data; ``kwargs`` may repeat them only with the same
    values (else UserError). A classifier of another size than the pretrained one is re-initialised
    by timm, and a first conv for other than 3 channels adapted from the RGB one.
    """
    spec = PREFIX + name
    timm = require_extra("timm", spec, "timm")
    arch, tag = _split_name(timm, spec, name)
    tag = _weights_tag(timm, spec, arch, tag, weights)
    if kwargs and "pretrained" in kwargs:
        raise UserError(f"model {spec!r}: set model.weights, not pretrained in model.kwargs")
    merged = merge_kwargs(spec, kwargs, {"num_classes": num_classes, "in_chans": channels})
    if drop_path_rate is not None:
        merged = merge_kwargs(spec, merged, {"drop_path_rate": drop_path_rate}, source="model.drop_path_rate")
    full_name = f"{arch}.{tag}" if tag else arch
    pretrained = weights is not None and load_weights
    if weights is not None and not load_weights:
        log.info("model.checkpoint given: not loading timm weights %s", full_name)
    if pretrained:
        merged.update(_local_weights(timm, full_name, num_classes, channels, merged.get("pretrained_cfg_overlay")))
    try:
        with hub_offline():
            model = call_with_kwargs(spec, timm.create_model, merged, full_name)
    except UserError:
        raise
    except Exception as exc:  # timm raises many types for kwargs that do not fit the network or its weights
        what = f"with weights {full_name}" if pretrained else "with these model.kwargs"
        raise UserError(f"model {spec!r} cannot be built {what}: {one_line(exc)}") from exc
    return model.train()


def timm_preprocessing(name: str, kwargs: Mapping[str, Any] | None = None, weights: str | None = None) -> Preprocessing:
    """timm model ``name``'s data config (its pretrained cfg), without building the model.

    The pretrained tag is the name's, else ``weights``' (when a tag), else timm's default; an
    ``img_size`` in ``kwargs`` replaces the cfg's input size.
    """
    spec = PREFIX + name
    timm = require_extra("timm", spec, "timm")
    arch, tag = _split_name(timm, spec, name)
    if not tag and weights not in (None, "DEFAULT"):
        tag = _weights_tag(timm, spec, arch, tag, weights)
    cfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    size = (kwargs or {}).get("img_size", cfg.input_size[1:] if cfg is not None else 224)
    if cfg is None:
        return Preprocessing(size=_square(spec, size))
    mode = cfg.crop_mode if cfg.crop_mode in CROP_MODES else "center"
    if mode != cfg.crop_mode:
        log.info("timm crop_mode %r of %s is not supported: using 'center'", cfg.crop_mode, name)
    if cfg.interpolation not in INTERPOLATIONS:
        log.info("timm interpolation %r of %s is not supported: using 'bicubic'", cfg.interpolation, name)
    if cfg.crop_pct and cfg.crop_pct > 1:
        log.info("timm crop_pct %s of %s is over 1: using 1 (no crop)", cfg.crop_pct, name)
    try:
        return Preprocessing(
            size=_square(spec, size),
            interpolation=cfg.interpolation if cfg.interpolation in INTERPOLATIONS else "bicubic",
            crop_pct=min(float(cfg.crop_pct or 0.875), 1.0),
            crop_mode=mode,
            mean=tuple(float(m) for m in (cfg.mean or IMAGENET_MEAN)),
            std=tuple(float(s) for s in (cfg.std or IMAGENET_STD)),
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"model {spec!r}: its data config does not fit rdprune's image pipeline ({one_line(exc)})") from exc


def _split_name(timm: Any, spec: str, name: str) -> tuple[str, str]:
    """(architecture, tag) of a timm name, or a UserError naming the nearest known architectures."""
    if not name:
        raise UserError(f"model {spec!r}: give a timm model name after '{PREFIX}', e.g. 'timm:resnet50'")
    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        near = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(near)}?" if near else "see timm.list_models()"
        raise UserError(f"unknown timm model {arch!r} in model {spec!r}: {hint}")
    if tag:
        _check_tag(timm, spec, arch, tag)
    return arch, tag


def _weights_tag(timm: Any, spec: str, arch: str, tag: str, weights: str | None) -> str:
    """The pretrained tag that ``weights`` selects (or the name's tag when no weights are wanted)."""
    if weights is None:
        return tag
    tags = _tags(timm, arch)
    if not tags:
        raise UserError(f"timm model {arch!r} has no pretrained weights: drop model.weights (model {spec!r})")
    if weights == "DEFAULT":
        return tag or tags[0]
    if tag and weights != tag:
        raise UserError(f"model {spec!r} names pretrained tag {tag!r} but model.weights is {weights!r}: set only one")
    _check_tag(timm, spec, arch, weights)
    return weights


def _check_tag(timm: Any, spec: str, arch: str, tag: str) -> None:
    tags = _tags(timm, arch)
    if tag not in tags:
        choices = ", ".join(["DEFAULT", *tags]) if tags else "none: drop model.weights"
        raise UserError(f"unknown pretrained tag {tag!r} for timm model {arch!r} (model {spec!r}): choose one of {choices}")


def _tags(timm: Any, arch: str) -> list[str]:
    """The pretrained tags of ``arch``, timm's default first."""
    return [n.partition(".")[2] for n in timm.models.get_arch_pretrained_cfgs(arch)]


def _local_weights(timm: Any, full_name: str, num_classes: int, channels: int, overlay: Any) -> dict[str, Any]:
    """create_model keywords that load ``full_name``'s weights from a local cached file, or a UserError."""
    cfg = timm.models.get_pretrained_cfg(full_name)
    found = _cached_weight_file(cfg)
    if found is None:
        places = f"{hf_hub_cache()} or {os.path.join(torch.hub.get_dir(), 'checkpoints')}"
        raise UserError(
            f"timm weights {full_name} are not in the local cache ({places}): run "
            f"timm.create_model('{full_name}', pretrained=True) on a machine with network and copy its cache "
            f"(HF_HOME) here, or set model.checkpoint to a local state_dict"
        )
    path, custom_load = found
    log.info("loading timm weights %s from %s", full_name, path)
    if cfg.num_classes != num_classes:
        log.info("timm re-initialises the classifier of %s: its weights have %s classes, num_classes is %d",
                 full_name, cfg.num_classes, num_classes)
    if cfg.input_size and cfg.input_size[0] != channels:
        log.info("timm adapts the first conv of %s from %d to %d input channels", full_name, cfg.input_size[0], channels)
    merged_overlay = {**(overlay or {}), "file": path, "custom_load": custom_load}
    return {"pretrained": True, "pretrained_cfg_overlay": merged_overlay}


def _cached_weight_file(cfg: Any) -> tuple[str, bool] | None:
    """(path, whether timm must read it with the model's own loader) of a cached weight file, or None.

    Mirrors where timm itself would download to: the Hugging Face hub (``hf_hub_id``, safetensors
    preferred) or torch.hub's checkpoint folder (``url``). The hub copy is a plain state_dict unless
    the cfg says ``custom_load='hf'`` for a named file; the url copy keeps the cfg's ``custom_load``.
    """
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in _hub_filenames(cfg.hf_hub_filename or "pytorch_model.bin"):
            path = cached_hub_file(repo, filename, revision or None)
            if path is not None:
                return path, bool(cfg.custom_load == "hf" and cfg.hf_hub_filename)
    if cfg.url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        if os.path.isfile(path):
            return path, bool(cfg.custom_load)
    return None


def _hub_filenames(filename: str) -> Iterator[str]:
    """``filename`` preceded by the safetensors file a hub repo may hold in its place."""
    if filename.endswith(".bin"):
        stem = filename[: -len(".bin")]
        yield {"pytorch_model": "model", "open_clip_pytorch_model": "open_clip_model"}.get(stem, stem) + ".safetensors"
    yield filename


def _square(spec: str, size: Any) -> int:
    """A square input size as one int; rdprune's image pipelines crop squares."""
    if isinstance(size, int):
        return size
    sizes = {int(s) for s in size}
    if len(sizes) != 1:
        raise UserError(f"model {spec!r} takes {'x'.join(str(int(s)) for s in size)} inputs; rdprune's image data is square")
    return sizes.pop()

