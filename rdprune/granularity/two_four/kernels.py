"""2:4 on the GPU: whether the kernels are here, what each layer and the model take dense and 2:4, the export.

Everything here needs CUDA with compute capability 8.0 or newer (``torch.sparse.to_sparse_semi_structured``
has no CPU kernel); :func:`kernels_missing` says why not, for the caller to report before any work.
Timings are in bf16, the dtype a 2:4 deployment runs in.

Per layer, ``F.linear`` is timed at the layer's real input shape (captured by a forward hook at the
latency batch) with the dense weight and with its 2:4 form, interleaved round by round and each
round a few calls between CUDA events, so the launch and synchronisation overhead of one call does
not swamp kernels of tens of microseconds.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rdprune.core.timing import interleaved_medians, layer_shapes, measure_latency
from rdprune.granularity.two_four.units import is_two_four, two_four_mask

log = logging.getLogger(__name__)

EXPORT_TOLERANCE = 5e-2
"""Largest |2:4 model - masked dense model| over the outputs, relative to max |masked dense|, both in bf16.

The two compute the same products with different kernels (a different summation order in fp32),
and every layer rounds its output to bf16 (8 significant bits: up to 0.4 % of a value), so the
outputs differ by roundings that compound over the blocks; the bound leaves room for a dozen
blocks of them, while a wrong mask or layout gives errors of the order of the outputs themselves."""
_ROUNDS, _WARMUP, _INNER = 15, 3, 10


def kernels_missing(device: torch.device | str | None = None) -> str | None:
    """Why 2:4 kernels cannot run on ``device`` (default: the current CUDA device), or None when they can."""
    if device is not None and torch.device(device).type != "cuda":
        return f"2:4 kernels run on CUDA GPUs of compute capability 8.0 or newer, not on {torch.device(device)}"
    if not torch.cuda.is_available():
        return "2:4 kernels need a CUDA GPU of compute capability 8.0 or newer, and CUDA is not available here"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"2:4 kernels need compute capability 8.0 or newer; {torch.cuda.get_device_name(device)} has "
                f"{major}.{minor}")
    return None


def backend() -> str:
    """The 2:4 kernels PyTorch uses here: cuSPARSELt where this build has it, else CUTLASS (candidates suit both)."""
    return "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"


def _two_four_tensor(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (2:4 already, on CUDA) as a semi-structured sparse tensor of :func:`backend`'s kind."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured

    return to_sparse_semi_structured(weight) if backend() == "cusparselt" else SparseSemiStructuredTensorCUTLASS.from_dense(weight)


def linear_input_shapes(model: nn.Module, names: Iterable[str], example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """(batch, rows per sample, in_features) of each named Linear layer's input in one forward pass of ``example``
    (its first call), from :func:`rdprune.core.timing.layer_shapes`: what ``F.linear`` multiplies."""
    names, shapes = list(names), layer_shapes(model, example)
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ValueError(f"layers never called in a forward pass: {missing[:5]}")
    return {n: (len(example), shapes[n].in_hw[0], shapes[n].in_channels) for n in names}


def _event_medians(fns: Sequence[Callable[[], object]], rounds: int = _ROUNDS, warmup: int = _WARMUP,
                   inner: int = _INNER) -> list[float]:
    """Median seconds of one call of each function: rounds in rotating order, ``inner`` calls between two CUDA events."""
    return interleaved_medians(fns, rounds, warmup, torch.device("cuda"), inner=inner, cuda_events=True)


@torch.inference_mode()
def layer_latency_us(layers: Mapping[str, nn.Linear], shapes: Mapping[str, tuple[int, ...]], *,
                     device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16) -> tuple[dict[str, int], dict[str, int]]:
    """(dense, 2:4) microseconds of ``F.linear`` for each layer at its input shape, whole microseconds of at least 1.

    Layers of one signature (weight shape, bias, input rows) are timed once.
    """
    device = torch.device(device)
    timed: dict[tuple, tuple[int, int]] = {}
    dense_us, sparse_us = {}, {}
    for name, module in layers.items():
        rows = math.prod(shapes[name][:-1])
        key = (tuple(module.weight.shape), module.bias is not None, rows)
        if key not in timed:
            weight = (module.weight.detach() * two_four_mask(module.weight)).to(device, dtype).contiguous()
            bias = None if module.bias is None else module.bias.detach().to(device, dtype)
            sparse = _two_four_tensor(weight)
            x = torch.randn(rows, weight.shape[1], device=device, dtype=dtype)
            dense_s, sparse_s = _event_medians([lambda: F.linear(x, weight, bias), lambda: F.linear(x, sparse, bias)])
            timed[key] = max(1, round(dense_s * 1e6)), max(1, round(sparse_s * 1e6))
        dense_us[name], sparse_us[name] = timed[key]
    return dense_us, sparse_us


def to_two_four(model: nn.Module, layers: Iterable[str], dtype: torch.dtype = torch.bfloat16,
                       device: torch.device | str = "cuda") -> nn.Module:
    """A copy of ``model`` in ``dtype`` on ``device`` whose named layers hold their weights as 2:4 sparse tensors.

    Each named layer's weight must already be 2:4 (the masked dense model of a run); the copy then
    computes what the masked dense model computes in ``dtype``, with the 2:4 kernels.
    """
    reason = kernels_missing(device)
    if reason is not None:
        raise RuntimeError(reason)
    exported = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    modules = dict(exported.named_modules())
    for name in layers:
        module = modules[name]
        if not is_two_four(module.weight):
            raise ValueError(f"layer {name!r} is not 2:4: apply its mask before the export")
        module.weight = nn.Parameter(_two_four_tensor(module.weight.detach().contiguous()), requires_grad=False)
    return exported


@torch.inference_mode()
def export_difference(reference: nn.Module, exported: nn.Module, example: torch.Tensor) -> float:
    """max |exported - reference| over the outputs for ``example``, relative to max |reference| (both models in one dtype)."""
    param = next(reference.parameters())
    x = example.to(param.device, param.dtype)
    expected, got = reference(x).float(), exported(x).float()
    return float((got - expected).abs().max()) / max(float(expected.abs().max()), 1e-30)


def model_latency_s(models: Sequence[nn.Module], example: torch.Tensor, repeats: int) -> list[float]:
    """Median seconds of one forward pass of each model (already on one CUDA device, in one dtype), timed interleaved."""
    param = next(models[0].parameters())
    return measure_latency(models, example.to(param.device, param.dtype), repeats=repeats, device=param.device)
