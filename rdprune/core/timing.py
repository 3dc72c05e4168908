"""Timing and shapes shared by every latency model: the layers a forward pass calls, and interleaved medians.

:func:`layer_shapes` records each ``nn.Conv2d`` / ``nn.Linear`` a forward pass calls with its input and
output shape (forward hooks); :func:`measure_latency` times whole models interleaved, one call at a time
in round robin, so that a load change on a shared machine hits every model alike. The latency tables of
the granularities build on these two.
"""
from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerShape:
    """A conv2d or linear layer's dense shape and where it sits."""

    name: str  # module name in model.named_modules()
    kind: str  # "conv2d" or "linear"
    in_channels: int  # dense input channels (linear: in_features)
    out_channels: int  # dense output channels (linear: out_features)
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1  # depthwise when groups == in_channels == out_channels
    in_hw: tuple[int, int] = (1, 1)  # input spatial size; linear: (rows per sample, 1), (1, 1) for a 2-d input
    out_hw: tuple[int, int] = (1, 1)
    bias: bool = False

    @property
    def depthwise(self) -> bool:
        """One channel count: pruning removes input and output channels together."""
        return self.kind == "conv2d" and self.groups == self.in_channels == self.out_channels and self.groups > 1


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    """Numeric padding of a conv; 'same' becomes the symmetric padding it implies."""
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
    return tuple(module.padding)


def _shape_of(name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LayerShape:
    if isinstance(module, nn.Conv2d):
        return LayerShape(name, "conv2d", module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                          _conv_padding(module), tuple(module.dilation), module.groups, tuple(x.shape[-2:]), tuple(y.shape[-2:]),
                          module.bias is not None)
    rows = math.prod(x.shape[1:-1])  # tokens of a (batch, tokens, features) input; 1 for (batch, features)
    return LayerShape(name, "linear", module.in_features, module.out_features, in_hw=(rows, 1), out_hw=(rows, 1),
                      bias=module.bias is not None)


def layer_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, LayerShape]:
    """Every nn.Conv2d / nn.Linear that the forward pass of `example` calls, in call order (forward hooks).

    A module called more than once is recorded at its first call (and logged); the table's time for it covers all its calls.
    """
    shapes: dict[str, LayerShape] = {}
    repeated: set[str] = set()

    def hook(name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if name in shapes:
            repeated.add(name)
        else:
            shapes[name] = _shape_of(name, module, args[0], output)

    handles = [m.register_forward_hook(functools.partial(hook, name)) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    if repeated:
        log.warning("layers called more than once per forward pass (shape of the first call kept): %s", ", ".join(sorted(repeated)))
    return shapes


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` inside, the previous count restored afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def interleaved_samples(fns: Sequence[Callable[[], object]], repeats: int, warmup: int, device: torch.device, *,
                        inner: int = 1, cuda_events: bool = False) -> list[list[float]]:
    """Seconds of `repeats` samples of each callable, timed one sample at a time in round robin after `warmup` rounds.

    A sample is `inner` calls, divided by `inner`. Every round starts one callable further on, so no
    callable always follows the same one (caches, clock boosts); a load change on a shared machine
    lands on all callables alike. A perf_counter loop (with CUDA synchronised on a GPU), or CUDA
    events around each sample with `cuda_events` (a GPU kernel of microseconds), rather than
    torch.utils.benchmark.Timer: Timer times one statement at a time (no interleaving) and its
    autorange spends a fixed minimum per statement, far too much for thousands of grid points.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(warmup + repeats):
        for k in range(len(fns)):
            j = (k + r) % len(fns)
            if cuda_events:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fns[j]()
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                sync()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fns[j]()
                sync()
                seconds = time.perf_counter() - t0
            if r >= warmup:
                samples[j].append(seconds / inner)
    return samples


def interleaved_medians(fns: Sequence[Callable[[], object]], repeats: int, warmup: int, device: torch.device, *,
                        inner: int = 1, cuda_events: bool = False) -> list[float]:
    """Median seconds of one call of each callable, timed as :func:`interleaved_samples` does."""
    return [statistics.median(s) for s in interleaved_samples(fns, repeats, warmup, device, inner=inner, cuda_events=cuda_events)]


def measure_latency(models: Sequence[nn.Module], example: torch.Tensor, *, repeats: int = 20, warmup: int = 3,
                    threads: int | None = None, device: torch.device | str = "cpu") -> list[float]:
    """Median seconds of one forward pass of each model, timed interleaved (round robin) in this process, so that
    load changes on a shared machine hit every model alike. torch.no_grad / inference mode; CUDA synchronised when on GPU.

    The models must already be on `device` and in the mode to time (normally ``eval()``); `example` is moved there.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = torch.device(device)
    x = example.to(device)
    with torch_threads(threads), torch.inference_mode():
        return interleaved_medians([functools.partial(m, x) for m in models], repeats, warmup, device)
