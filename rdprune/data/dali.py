"""NVIDIA DALI input pipelines for ImageNet-style ImageFolder data: training, validation, calibration.

The file lists come from the torchvision ImageFolder that ``build_data`` already validated, so
both backends agree on classes and labels. Pipelines decode on the GPU (``mixed``) when the
process computes on CUDA and run CPU-only (``device_id=None``) otherwise. Everything yields
plain ``(x, y)`` tensors: x float32 (N, 3, size, size), y int64.

Every pipeline follows a ``Preprocessing`` (default ``RESNET``) exactly as the torchvision
transforms of ``rdprune.data.imagenet`` do: the evaluation resize goes to the same integer
output size torchvision computes (its truncated longer side, not DALI's own rounding), with
antialiasing when scaling down as PIL does, and the centre crop starts where torchvision's does
(Python's round-half-to-even). EXIF orientation is ignored, as PIL's loader in ImageFolder
ignores it. On the CPU the two backends then agree to about one grey level (see
tests/test_preprocessing.py for the measured tolerance).

DALI cannot skip a file that fails to decode, so the files are checked cheaply (format
signature, JPEG end marker) before a pipeline starts, and a decoding error that still happens is
turned into a one-line error naming the file.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import torch

from rdprune.data.preprocessing import RESNET, Preprocessing
from rdprune.errors import UserError

log = logging.getLogger(__name__)

READER = "reader"
"""Name of the file reader in every pipeline, so the iterator can count the shard exactly."""

Sample = tuple[str, int]
"""(image path, class index) as in torchvision's ``ImageFolder.samples``."""

# Formats DALI's image decoder reads, by their leading bytes.
_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"BM",  # BMP
    b"II*\x00", b"MM\x00*",  # TIFF
    b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51",  # JPEG 2000 (file, codestream)
    b"P1", b"P2", b"P3", b"P4", b"P5", b"P6",  # PNM
)
_JPEG_TAIL = 1024
"""A complete JPEG ends with the EOI marker; some writers append a little padding after it."""
_DECODE_FAILURE = re.compile(r"Failed to decode sample #\d+ : (\S+)")


def require_dali() -> ModuleType:
    """The ``nvidia.dali`` module, or a UserError that says how to install it."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as exc:
        raise UserError("data.backend 'dali' needs NVIDIA DALI: pip install 'rdprune[dali]' "
                        "(or nvidia-dali-cuda120)") from exc
    return nvidia.dali


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported here."""
    try:
        require_dali()
    except UserError:
        return False
    return True


def folder_samples(dataset: Any) -> list[Sample]:
    """The (path, label) list of a torchvision ImageFolder, or of a Subset of one."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = folder_samples(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise UserError(f"data.backend 'dali' reads image folders, but the dataset is a {type(dataset).__name__}; "
                        "use data.backend 'torchvision'")
    return [(str(path), int(label)) for path, label in samples]


def check_image_file(path: str) -> str | None:
    """Why ``path`` cannot be decoded (not an image, truncated JPEG), or None when it looks sound."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if not any(head.startswith(s) for s in _SIGNATURES):
                return "is not an image DALI can decode (JPEG, PNG, BMP, TIFF, JPEG 2000, PNM)"
            if head.startswith(_SIGNATURES[0]):
                size = f.seek(0, 2)
                f.seek(max(0, size - _JPEG_TAIL))
                if b"\xff\xd9" not in f.read():
                    return "is a truncated JPEG (no end marker)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


def check_image_files(paths: Sequence[str], threads: int = 8) -> None:
    """Raise a UserError naming the first file DALI could not decode; reads ~1 KiB per file."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for path, problem in zip(paths, pool.map(check_image_file, paths, chunksize=256)):
            if problem:
                raise UserError(f"data.backend 'dali': {path} {problem}; remove or replace it")


def calibration_choice(count: int, size: int, seed: int, key: str = "calibration.size") -> list[int]:
    """Indices of the ``size`` calibration images among ``count``, drawn from ``seed`` (same on every rank).

    The same draw as the torchvision backend's, so both backends calibrate on the same images.
    """
    if size > count:
        raise UserError(f"{key} {size} is larger than the {count} training images; "
                        f"choose at most {count}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:size].tolist()


def _device_id(device: torch.device) -> int | None:
    """DALI's device id: the local GPU for CUDA processes, None for CPU-only pipelines."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _interp_type(preprocessing: Preprocessing) -> Any:
    """DALI's interpolation for the model's; DALI antialiases linear and cubic when scaling down, like PIL."""
    from nvidia.dali import types
    return {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC,
            "nearest": types.INTERP_NN}[preprocessing.interpolation]


def _normalize_args(preprocessing: Preprocessing) -> dict[str, list[float]]:
    """Mean and std for ``crop_mirror_normalize``, which works in 0..255 pixel units."""
    return {"mean": [m * 255 for m in preprocessing.mean], "std": [s * 255 for s in preprocessing.std]}


def _centre_offset(excess: Any) -> Any:
    """torchvision's centre-crop offset ``int(round(excess / 2))``, rounding half to even.

    Integer arithmetic only, so it works on Python ints and on DALI integer DataNodes alike:
    an odd excess 2k + 1 starts at k when k is even and at k + 1 when k is odd.
    """
    half = excess // 2
    return half + (excess - 2 * half) * (half - 2 * (half // 2))


def _train_pipeline(samples: Sequence[Sample], shard: int, shards: int, order_seed: int, gpu: bool,
                    preprocessing: Preprocessing):
    from nvidia.dali import fn, pipeline_def, types

    pre = preprocessing

    @pipeline_def
    def train():
        # shuffle_after_epoch reshuffles the whole list identically on every rank (same seed), so the
        # shards stay disjoint, cover the set each epoch and mix classes.
        jpegs, labels = fn.readers.file(
            files=[p for p, _ in samples], labels=[c for _, c in samples], shard_id=shard, num_shards=shards,
            shuffle_after_epoch=True, seed=order_seed, pad_last_batch=True, name=READER,
        )
        images = fn.decoders.image_random_crop(
            jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False,
            random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
        )
        images = fn.resize(images, resize_x=pre.size, resize_y=pre.size, interp_type=_interp_type(pre), antialias=True)
        images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), **_normalize_args(pre),
                                          dtype=types.FLOAT, output_layout="CHW")
        return images, labels

    return train


def _eval_pipeline(samples: Sequence[Sample], shard: int, shards: int, gpu: bool, preprocessing: Preprocessing):
    from nvidia.dali import fn, pipeline_def, types

    pre = preprocessing
    side = pre.resize_size

    @pipeline_def
    def evaluation():
        # Padding the last batch with repeats keeps batches full; the iterator drops the repeats
        # (reader_name + PARTIAL), so every image counts exactly once across the ranks.
        jpegs, labels = fn.readers.file(
            files=[p for p, _ in samples], labels=[c for _, c in samples], shard_id=shard, num_shards=shards,
            random_shuffle=False, stick_to_shard=True, pad_last_batch=True, name=READER,
        )
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   adjust_orientation=False)
        if pre.crop_mode == "center":
            # torchvision's output size: the shorter side becomes `side`, the longer one
            # floor(side * long / short); DALI's resize_shorter would round it and shift the scale.
            shape = fn.peek_image_shape(jpegs, adjust_orientation=False, dtype=types.INT64)
            height, width = shape[0], shape[1]
            wide = fn.cast(width > height, dtype=types.INT64)  # 0 when the width is the shorter side
            new_h = wide * side + (1 - wide) * (side * height // width)
            new_w = (1 - wide) * side + wide * (side * width // height)
            start = fn.cast(fn.stack(_centre_offset(new_h - pre.size), _centre_offset(new_w - pre.size)), dtype=types.INT32)
            new_h, new_w = fn.cast(new_h, dtype=types.FLOAT), fn.cast(new_w, dtype=types.FLOAT)
        else:
            new_h = new_w = float(side)
            start = [_centre_offset(side - pre.size)] * 2
        images = fn.resize(images, resize_x=new_w, resize_y=new_h, interp_type=_interp_type(pre), antialias=True)
        images = fn.slice(images, start=start, shape=[pre.size, pre.size], axis_names="HW")
        images = fn.crop_mirror_normalize(images, **_normalize_args(pre), dtype=types.FLOAT, output_layout="CHW")
        return images, labels

    return evaluation


def _batches(pipe, endless: bool, paths: Sequence[str], threads: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y int64)`` batches of one pass over the pipeline's shard, or endless passes.

    ``paths`` are the files the pipeline may read, searched for the culprit when DALI fails to
    decode an image without naming it.
    """
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    try:
        pipe.build()
        batches = DALIGenericIterator([pipe], ["x", "y"], reader_name=READER,
                                      last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=endless)
        while True:
            for (batch,) in batches:
                yield batch["x"], batch["y"].view(-1).to(torch.int64)
            if not endless:
                return
    except RuntimeError as exc:
        if "decoders." not in str(exc):
            raise
        found = _DECODE_FAILURE.search(str(exc))
        culprit = found.group(1) if found else _first_undecodable(paths, threads)
        if culprit is None:
            raise
        raise UserError(f"data.backend 'dali': cannot decode {culprit}; remove or replace it") from exc


def _undecodable(path: str) -> bool:
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.convert("RGB")
    except Exception:  # noqa: BLE001 - any failure to decode is what we are looking for
        return True
    return False


def _first_undecodable(paths: Sequence[str], threads: int) -> str | None:
    """The first file PIL cannot decode either: DALI's decoder does not always say which one failed."""
    log.warning("DALI failed to decode an image without naming it: decoding %d files to find it", len(paths))
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return next((p for p, bad in zip(paths, pool.map(_undecodable, paths)) if bad), None)


_checked: set[tuple[str, int, int, int]] = set()
"""Shards already checked in this process: each iteration's fine-tuning reuses the same files."""


def _check_shard(samples: Sequence[Sample], rank: int, world_size: int, threads: int) -> None:
    """Check every ``world_size``-th file from ``rank``; the ranks together check them all."""
    key = (samples[0][0] if samples else "", len(samples), rank, world_size)
    if key not in _checked:
        check_image_files([p for p, _ in samples[rank::world_size]], threads)
        _checked.add(key)


class EvalBatches(Iterable[tuple[torch.Tensor, torch.Tensor]]):
    """This rank's contiguous shard of the validation images, once per ``iter``.

    The evaluation transform of ``preprocessing`` (for ``RESNET``: shorter side to 256, centre crop
    224, ImageNet mean/std). Each pass builds a fresh pipeline (milliseconds), so nothing is held
    between evaluations.
    """

    def __init__(self, samples: Sequence[Sample], batch_size: int, rank: int, world_size: int,
                 device: torch.device, threads: int, preprocessing: Preprocessing = RESNET):
        self._make = _eval_pipeline(samples, rank, world_size, device.type == "cuda", preprocessing)
        self._batch_size, self._threads, self._device = batch_size, threads, device
        count = len(samples)  # DALI's shard: a contiguous range of the list
        self._paths = [p for p, _ in samples[rank * count // world_size:(rank + 1) * count // world_size]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pipe = self._make(batch_size=self._batch_size, num_threads=self._threads,
                          device_id=_device_id(self._device), seed=0)
        return _batches(pipe, False, self._paths, self._threads)


def eval_batches(samples: Sequence[Sample], batch_size: int, rank: int, world_size: int, device: torch.device,
                 threads: int, *, preprocessing: Preprocessing = RESNET) -> EvalBatches:
    """This rank's share of the validation set, preprocessed for evaluation: the ranks together see
    every image exactly once."""
    require_dali()
    if len(samples) < world_size:
        raise UserError(f"the validation set has {len(samples)} images, fewer than the {world_size} processes")
    _check_shard(samples, rank, world_size, threads)
    return EvalBatches(samples, batch_size, rank, world_size, device, threads, preprocessing)


def train_batches(samples: Sequence[Sample], batch_size: int, rank: int, world_size: int, device: torch.device,
                  seed: int, threads: int, *, preprocessing: Preprocessing = RESNET) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless augmented batches of this rank's shard; the whole list is reshuffled every epoch.

    Random resized crop to ``preprocessing.size`` (8-100 % of the area, aspect 3/4-4/3, its
    interpolation), horizontal flip, its mean and std. The file order depends on ``seed`` only,
    the augmentation also on the rank.
    """
    require_dali()
    if len(samples) < world_size:
        raise UserError(f"the training set has {len(samples)} images, fewer than the {world_size} processes")
    _check_shard(samples, rank, world_size, threads)
    make = _train_pipeline(samples, rank, world_size, seed, device.type == "cuda", preprocessing)
    pipe = make(batch_size=batch_size, num_threads=threads, device_id=_device_id(device), seed=seed * 1009 + rank)
    return _batches(pipe, True, [p for p, _ in samples], threads)


def calibration_images(samples: Sequence[Sample], size: int, seed: int, batch_size: int, threads: int,
                       key: str = "calibration.size", *, preprocessing: Preprocessing = RESNET) -> torch.Tensor:
    """``size`` training images chosen by ``seed``, with the evaluation transform of ``preprocessing``,
    as one (size, 3, S, S) tensor (S = ``preprocessing.size``).

    Decoded on the CPU in file order, so every rank gets bit-identical inputs (the curves, and
    with them the masks, must agree across ranks).
    """
    require_dali()
    chosen = [samples[i] for i in calibration_choice(len(samples), size, seed, key)]
    paths = [p for p, _ in chosen]
    check_image_files(paths, threads)
    make = _eval_pipeline(chosen, 0, 1, False, preprocessing)
    pipe = make(batch_size=min(batch_size, size), num_threads=threads, device_id=None, seed=0)
    images = torch.cat([x for x, _ in _batches(pipe, False, paths, threads)])
    if len(images) != size:
        raise RuntimeError(f"DALI returned {len(images)} calibration images, expected {size}")
    return images
