"""Build a network by name, optionally with pretrained weights or a local checkpoint.

Names take four forms:

- a registered builder (``MODEL_NAMES``): rdprune's CIFAR ResNets, VGG-16 and small_cnn, and
  torchvision models (with torchvision's pretrained weights through ``weights``);
- ``timm:<model name>`` or ``timm:<model name>.<pretrained tag>``: ``timm.create_model``;
- ``hf:<local folder or repo id>``: a Hugging Face image classifier, its forward returning logits;
- ``package.module:callable`` for a user's own network.

The prefixes ``timm:`` and ``hf:`` are reserved (never an import path), and their models load from
local files and caches only (``rdprune.models.hub``). ``kwargs`` reach the timm, Hugging Face
(config overrides), torchvision and import-path builders. Every mistake a user can make here
(unknown name, failing import, missing extra, missing, corrupt or ill-fitting checkpoint, weights
that cannot be downloaded or are not cached) is a one-line ``UserError``.

Models take the input's channel count from ``input_shape`` (C, H, W), as they take ``num_classes``:
the CIFAR ResNets, VGG-16 and small_cnn build their first conv for C channels, torchvision models
get a C-channel stem in place of their RGB one (but torchvision's pretrained weights need C = 3),
a user's callable receives ``in_channels=C`` when its signature names that parameter, and timm and
Hugging Face models get ``in_chans=C`` / ``num_channels=C``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torchvision
from torch import nn

from rdprune.errors import UserError
from rdprune.errors import one_line as _one_line
from rdprune.imports import IMPORT_FORM, accepts_keyword, load_callable
from rdprune.models.builder_kwargs import call_with_kwargs, merge_kwargs
from rdprune.models.cifar_resnet import resnet20, resnet32, resnet44, resnet56
from rdprune.models.digit_nets import MobileNetV2Digits, PlainBNCNN
from rdprune.models.small_cnn import SmallCNN
from rdprune.models.vgg_cifar import vgg16_cifar

if TYPE_CHECKING:
    from rdprune.data.preprocessing import Preprocessing

log = logging.getLogger(__name__)

Builder = Callable[[int, "tuple[int, ...] | None"], nn.Module]
_BUILDERS: dict[str, Builder] = {}
def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(num_classes, input_shape)`` under ``name``.

    ``input_shape`` is (C, H, W) or None when unknown; builders take their channel count from it
    (``input_channels(input_shape)``).
    """
    def decorate(builder: Builder) -> Builder:
        _BUILDERS[name] = builder
        return builder
    return decorate


def input_channels(input_shape: Sequence[int] | None) -> int:
    """The channel count C of an image shape (C, H, W); 3 (RGB) when the shape is unknown or not an image's."""
    return int(input_shape[0]) if input_shape is not None and len(input_shape) == 3 else 3


@register("small_cnn")
def _small_cnn(num_classes: int, input_shape: tuple[int, ...] | None) -> nn.Module:
    return SmallCNN(num_classes, input_shape or (1, 28, 28))


@register("plain_bn_cnn")
def _plain_bn_cnn(num_classes: int, input_shape: tuple[int, ...] | None) -> nn.Module:
    """VGG-style BatchNorm CNN without residuals (six conv layers): a channel-pruning test bed for digits."""
    return PlainBNCNN(num_classes, in_channels=input_channels(input_shape))


@register("mobilenetv2_digits")
def _mobilenetv2_digits(num_classes: int, input_shape: tuple[int, ...] | None) -> nn.Module:
    """MobileNetV2-style network (depthwise convs, inverted residuals) sized for 28x28 digits."""
    return MobileNetV2Digits(num_classes, in_channels=input_channels(input_shape))


@register("resnet20_cifar")
def _resnet20(num_classes: int, input_shape: tuple[int, ...] | None) -> nn.Module:
    return resnet20(num_classes=num_classes, in_channels=input_channels(input_shape))


@register("resnet20_cifar_proj")
def _resnet20_proj(num_classes: int, input_shape: tuple[int, ...] | None) -> nn.Module:
    """ResNet-20 with 1x1 projection shortcuts: the CIFAR ResNet for channel granularity."""
    return resnet20(num_classes=num_classes, in_channels=input_channels(input_shape), shortcut="projection")


@register("resnet32_cifar")
def _resnet32(num_classes: int, input_shape: tuple[int, ...] | None) -> nn.Module:
    return resnet32(num_classes=num_classes, in_channels=input_channels(input_shape))


@register("resnet44_cifar")
def _resnet44(num_classes: int, input_shape: tuple[int, ...] | None) -> nn.Module:
    return resnet44(num_classes=num_classes, in_channels=input_channels(input_shape))


@register("resnet56_cifar")
def _resnet56(num_classes: int, input_shape: tuple[int, ...] | None) -> nn.Module:
    return resnet56(num_classes=num_classes, in_channels=input_channels(input_shape))


@register("vgg16_cifar")
def _vgg16(num_classes: int, input_shape: tuple[int, ...] | None) -> nn.Module:
    return vgg16_cifar(num_classes, in_channels=input_channels(input_shape))


# Each torchvision model's first conv (the only one that sees the input's channels), and the
# kaiming_normal_ mode torchvision initialises it with, so a replacement stem starts like the original.
_TORCHVISION_STEMS: dict[str, tuple[str, str]] = {
    "resnet18": ("conv1", "fan_out"),
    "resnet50": ("conv1", "fan_out"),
    "vgg16_bn": ("features.0", "fan_out"),
    "densenet121": ("features.conv0", "fan_in"),
    "efficientnet_b0": ("features.0.0", "fan_out"),
    "mobilenet_v2": ("features.0.0", "fan_out"),
}


def _torchvision_builder(name: str) -> Builder:
    def build(num_classes: int, input_shape: tuple[int, ...] | None, **kwargs: Any) -> nn.Module:
        kwargs = merge_kwargs(name, kwargs, {"num_classes": num_classes})
        model = call_with_kwargs(name, torchvision.models.get_model, kwargs, name)
        channels = input_channels(input_shape)
        if channels != 3:
            _replace_stem(model, name, channels)
        return model
    return build


def _replace_stem(model: nn.Module, name: str, channels: int) -> None:
    """Swap torchvision model ``name``'s RGB stem conv for a freshly initialised ``channels``-input one."""
    path, mode = _TORCHVISION_STEMS[name]
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, attr)
    assert isinstance(old, nn.Conv2d) and old.in_channels == 3 and old.groups == 1, f"{name} stem is {old}"
    new = nn.Conv2d(channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                    dilation=old.dilation, bias=old.bias is not None, padding_mode=old.padding_mode)
    nn.init.kaiming_normal_(new.weight, mode=mode, nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    setattr(parent, attr, new)


TORCHVISION_MODELS: tuple[str, ...] = tuple(_TORCHVISION_STEMS)
"""The torchvision models the registry builds (with a C-channel stem for C != 3)."""

for _name in TORCHVISION_MODELS:
    register(_name)(_torchvision_builder(_name))

MODEL_NAMES: list[str] = list(_BUILDERS)

__all__ = [
    "IMPORT_FORM", "MODEL_NAMES", "TORCHVISION_MODELS", "accepts_keyword", "build_model", "input_channels",
    "load_callable", "load_checkpoint", "model_preprocessing", "register",
]


def build_model(
    name: str,
    num_classes: int,
    *,
    checkpoint: str | None = None,
    weights: str | None = None,
    input_shape: Sequence[int] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    drop_path_rate: float | None = None,
) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs, in training mode, on the CPU.

    ``weights`` loads pretrained weights: for a torchvision model with 1000 classes "DEFAULT" or an
    enum name such as "IMAGENET1K_V2" (downloaded by torchvision); for ``timm:`` "DEFAULT" or a
    pretrained tag, for ``hf:`` "DEFAULT", both from local files and caches only. ``checkpoint``
    loads a local state_dict and takes precedence over ``weights`` (which are then validated but not
    loaded), so a user without network can follow the download error's advice without editing
    ``weights`` too. ``input_shape`` (C, H, W) gives the models their input channel count C and sizes
    shape-dependent builders (small_cnn); it is checked with one dry-run forward, so a model/data
    mismatch is reported here and not deep inside training.

    ``kwargs`` go to the timm builder, the Hugging Face config, ``torchvision.models.get_model`` or a
    user's callable (rdprune's own models take none); ``drop_path_rate`` to timm and Hugging Face
    models that have it and to callables that take it. The class and channel counts are passed
    automatically; ``kwargs`` may repeat them only with the same values.
    """
    from rdprune.models import hub  # here, not at the top: hub imports rdprune.data, whose registry imports this module

    shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
    kwargs = dict(kwargs or {})
    if hub.is_hub_name(name):
        model = hub.build_hub_model(name, num_classes, input_channels(shape), weights=weights, kwargs=kwargs,
                                    drop_path_rate=drop_path_rate, load_weights=checkpoint is None)
    elif weights is not None:
        _check_no_drop_path(name, drop_path_rate)
        model = _pretrained_torchvision(name, num_classes, weights, download=checkpoint is None, input_shape=shape,
                                        kwargs=kwargs)
    elif name in _BUILDERS:
        _check_no_drop_path(name, drop_path_rate)
        if kwargs and name not in TORCHVISION_MODELS:
            raise UserError(
                f"model.kwargs is for timm:, hf:, torchvision and import-path models, not {name!r}: "
                f"remove model.kwargs ({', '.join(map(str, kwargs))})"
            )
        model = _BUILDERS[name](num_classes, shape, **kwargs)
    elif ":" in name:
        model = _user_model(name, num_classes, shape, kwargs=kwargs, drop_path_rate=drop_path_rate)
    else:
        raise UserError(
            f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}, timm:<name>, hf:<folder or repo id>, "
            f"or give an import path '{IMPORT_FORM}'"
        )
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, model_name=name)
    if shape is not None:
        _check_forward(model, name, num_classes, shape)
    return model


def model_preprocessing(name: str, kwargs: Mapping[str, Any] | None = None, *, weights: str | None = None) -> Preprocessing | None:
    """The preprocessing model ``name`` comes with (timm's pretrained cfg, a Hugging Face processor config),
    or None for the dataset's default; see :func:`rdprune.models.hub.model_preprocessing`."""
    from rdprune.models import hub  # lazily, as in build_model

    return hub.model_preprocessing(name, kwargs, weights=weights)


def _check_no_drop_path(name: str, drop_path_rate: float | None) -> None:
    if drop_path_rate is not None:
        raise UserError(
            f"model.drop_path_rate is for timm:, hf: and import-path models that take it, not {name!r}: "
            f"remove model.drop_path_rate"
        )


def _user_model(
    spec: str,
    num_classes: int,
    input_shape: tuple[int, ...] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    drop_path_rate: float | None = None,
) -> nn.Module:
    """Call the user's ``package.module:callable`` with the automatic keywords it takes and ``kwargs``."""
    factory = load_callable(spec, "model")
    automatic: dict[str, int] = {}
    if accepts_keyword(factory, "num_classes"):
        automatic["num_classes"] = num_classes
    # in_channels only where the signature names it: builders that forward **kwargs to a constructor
    # (torchvision.models:resnet18, for one) would fail on a keyword they never asked for.
    image = input_shape is not None and len(input_shape) == 3
    if image and accepts_keyword(factory, "in_channels", through_kwargs=False):
        automatic["in_channels"] = input_channels(input_shape)
    merged = merge_kwargs(spec, kwargs, automatic)
    if drop_path_rate is not None:
        merged = merge_kwargs(spec, merged, {"drop_path_rate": drop_path_rate}, source="model.drop_path_rate")
    model = call_with_kwargs(spec, factory, merged)
    if not isinstance(model, nn.Module):
        raise UserError(f"model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _pretrained_torchvision(
    name: str, num_classes: int, weights: str, download: bool, input_shape: tuple[int, ...] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    if name not in TORCHVISION_MODELS:
        raise UserError(
            f"model.weights is only for torchvision models ({', '.join(TORCHVISION_MODELS)}), timm: and hf: models, "
            f"not {name!r}; use model.checkpoint for a local state_dict"
        )
    if num_classes != 1000:
        raise UserError(
            f"torchvision weights {weights!r} for {name} have 1000 classes, but num_classes is "
            f"{num_classes}; set num_classes to 1000 or drop model.weights"
        )
    channels = input_channels(input_shape)
    if channels != 3:
        raise UserError(
            f"torchvision weights {weights!r} for {name} take 3-channel (RGB) inputs, but the data has "
            f"{channels} channel{'s' if channels != 1 else ''} (input shape {list(input_shape)}); "
            f"drop model.weights to train {name} from scratch with a {channels}-channel stem"
        )
    enum = torchvision.models.get_model_weights(name)
    allowed = ["DEFAULT"] + [w.name for w in enum]
    if weights not in allowed:
        raise UserError(f"unknown torchvision weights {weights!r} for {name}: choose one of {', '.join(allowed)}")
    if not download:
        log.info("model.checkpoint given: not downloading torchvision weights %r for %s", weights, name)
        return _BUILDERS[name](num_classes, input_shape, **(kwargs or {}))
    url = enum[weights].url if weights != "DEFAULT" else enum.DEFAULT.url
    try:
        return call_with_kwargs(name, torchvision.models.get_model, dict(kwargs or {}, weights=weights), name)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a broken partial file a RuntimeError
        raise UserError(
            f"cannot download torchvision weights {weights!r} for {name} ({_one_line(exc)}); "
            f"download them elsewhere ({url}) and set model.checkpoint to the .pth file"
        ) from exc


def load_checkpoint(model: nn.Module, path: str | os.PathLike, model_name: str | None = None) -> None:
    """Load a state_dict file into ``model`` (CPU, ``weights_only=True``), or raise a one-line UserError.

    Accepts a plain state_dict or a dict holding it under "state_dict" or "model", and strips the
    "module." prefix that DistributedDataParallel adds; a model with an ``adapt_state_dict`` method
    (``HFImageClassifier``) maps the keys before they are compared.
    """
    path = os.fspath(path)
    model_name = model_name or type(model).__name__
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file (UnpicklingError, RuntimeError, EOFError)
        raise UserError(f"checkpoint {path} is not a readable PyTorch state_dict: {_one_line(exc)}") from exc
    state = _unwrap_state_dict(loaded, path)
    adapt = getattr(model, "adapt_state_dict", None)  # a wrapper that also takes its inner model's keys (hf: models)
    if callable(adapt):
        state = adapt(state)
    mismatch = _mismatch(model.state_dict(), state)
    if mismatch:
        raise UserError(f"checkpoint {path} does not fit model {model_name}: {mismatch}")
    model.load_state_dict(state)


def _unwrap_state_dict(loaded: object, path: str) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping):
        raise UserError(
            f"checkpoint {path} is not a readable PyTorch state_dict: it holds a "
            f"{type(loaded).__name__}, not a dict of tensors"
        )
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(
                f"checkpoint {path} is not a readable PyTorch state_dict: entry {key!r} is a "
                f"{type(value).__name__}, not a tensor"
            )
    if loaded and all(str(k).startswith("module.") for k in loaded):
        return {k[len("module."):]: v for k, v in loaded.items()}
    return dict(loaded)


def _mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str:
    """Describe how ``found`` fails to fit ``expected``, or "" when it fits."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = [_count_keys(missing, "missing"), _count_keys(unexpected, "unexpected")]
        return ", ".join(p for p in parts if p)
    for key, tensor in expected.items():
        if found[key].shape != tensor.shape:
            return (f"key {key} has shape {list(found[key].shape)} in the checkpoint, "
                    f"{list(tensor.shape)} in the model")
    return ""


def _count_keys(keys: list[str], kind: str, shown: int = 5) -> str:
    if not keys:
        return ""
    listed = ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")
    return f"{len(keys)} {kind} key{'s' if len(keys) != 1 else ''} ({listed})"


def _check_forward(model: nn.Module, name: str, num_classes: int, shape: tuple[int, ...]) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *shape))
    except Exception as exc:  # a shape error can surface as any exception type in user code
        from rdprune.models.hub import input_size_key  # here: hub imports rdprune.data, whose registry imports this module

        size_key = input_size_key(name)
        hint = f"; set the model's input size with model.kwargs.{size_key}: {shape[-1]}" if size_key and len(shape) == 3 else ""
        reason = _one_line(exc).rstrip(".") if hint else _one_line(exc)
        raise UserError(f"model {name} does not accept inputs of shape {list(shape)}: {reason}{hint}") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"model {name} returns {got} for one input of shape {list(shape)}; expected [1, {num_classes}] logits"
        )
