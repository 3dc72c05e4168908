"""Physical channel removal and portable export: the end of a channel-granularity run.

Pruning itself zeroes channels with masks; here the zeroed channels are really removed (with every channel coupled to
them, found by Torch-Pruning's dependency graph) and the smaller model is written as a ``torch.export`` program and an
ONNX file, both loadable without rdprune and without unpickling arbitrary classes.
"""
from __future__ import annotations

import copy
import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from rdprune.core.runtimes import export_program as _export_program
from rdprune.errors import UserError
from rdprune.files import atomic_write

INSTALL_CHANNELS = "pip install 'rdprune[channels]'"
ONNX_TOLERANCE = 1e-4


def require_torch_pruning() -> ModuleType:
    """Import ``torch_pruning``, or raise a ``UserError`` saying which extra installs it."""
    try:
        import torch_pruning
    except ImportError as err:
        raise UserError(f"prune.granularity channel needs the optional dependency torch-pruning: {INSTALL_CHANNELS}") from err
    return torch_pruning


# ---------------------------------------------------------------------------------------------------------- removal


@dataclass
class _Cut:
    """One pruning operation (a handler on a graph node) with the union of the indices all requested groups give it."""

    dep: Any  # a torch_pruning Dependency: its handler prunes its target node along one dimension
    idxs: set[int] = field(default_factory=set)
    roots: list[str] = field(default_factory=list)


def remove_channels(model: nn.Module, example: torch.Tensor, removal: Mapping[str, Sequence[int]]) -> nn.Module:
    """A smaller deep copy of ``model`` (eval mode) without the output channels ``removal`` names, nor those coupled to them.

    ``removal`` maps root layer names (``nn.Conv2d`` or ``nn.Linear``, as in ``named_modules()``) to output-channel
    indices in the original's numbering. The groups of all roots are computed on the unpruned graph, and each pruning
    operation is applied once with the union of the indices every group gives it: no group's removal renumbers the
    indices of another (as sequential pruning would, e.g. for a consumer of a concatenation fed by two groups).
    Raises ``ValueError`` for unknown roots, out-of-range indices, a group left without channels, or a dependency graph
    that Torch-Pruning got wrong for this model (checked before pruning, and by running the copy on ``example``).
    """
    tp = require_torch_pruning()
    wanted = _checked_removal(model, removal)
    pruned = copy.deepcopy(model).eval()
    names = {id(module): name for name, module in pruned.named_modules()}
    with torch.no_grad():
        expected = _shapes(pruned(example))
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=example, verbose=False)
    cuts = _merged_cuts(graph, dict(pruned.named_modules()), wanted)
    _check_channel_preserving(tp, cuts)
    _check_cut_sizes(graph, cuts, names)
    _check_grouped_convs(graph, cuts, names)
    for cut in cuts.values():
        _apply(tp, graph, pruned, cut)
    _check_runs(pruned, example, expected)
    return pruned


def _checked_removal(model: nn.Module, removal: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """``removal`` with sorted, distinct indices and empty lists dropped; ``ValueError`` for bad names or indices."""
    modules = dict(model.named_modules())
    unknown = sorted(name for name in removal if name not in modules)
    if unknown:
        raise ValueError(f"channel removal names layers that are not in the model: {unknown[:5]}")
    wanted = {}
    for name, idxs in removal.items():
        layer = modules[name]
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"channel removal root {name!r} is a {type(layer).__name__}, not an nn.Conv2d or nn.Linear")
        size = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        bad = sorted({int(i) for i in idxs if not 0 <= int(i) < size})
        if bad:
            raise ValueError(f"channel indices {bad[:5]} of layer {name!r} are out of range: it has {size} output channels")
        if idxs:
            wanted[name] = sorted({int(i) for i in idxs})
    return wanted


def _merged_cuts(graph: Any, modules: Mapping[str, nn.Module], wanted: Mapping[str, list[int]]) -> dict[tuple, _Cut]:
    """The pruning operations of every root's group, merged by (node, handler), all indexed on the unpruned graph."""
    cuts: dict[tuple, _Cut] = {}
    for name, idxs in wanted.items():
        layer = modules[name]
        if layer not in graph.module2node:
            raise ValueError(f"layer {name!r} is not in torch-pruning's dependency graph: its output does not reach the model's output")
        group = graph.get_pruning_group(layer, graph.get_pruner_of_module(layer).prune_out_channels, idxs)
        for dep, dep_idxs in group:
            cut = cuts.setdefault((dep.target, dep.handler), _Cut(dep))
            cut.idxs.update(int(i) for i in dep_idxs)
            if name not in cut.roots:
                cut.roots.append(name)
    return cuts


def _check_channel_preserving(tp: ModuleType, cuts: Mapping[tuple, _Cut]) -> None:
    """``ValueError`` if a group runs through an op Torch-Pruning treats as channel-wise but that changes the channel count.

    Torch-Pruning 1.6 maps indices one-to-one through every "element-wise" op (its catch-all: F.pad, reductions, ...).
    A shortcut that zero-pads 16 channels to 64 then couples channel i of one with channel i of the other: the copy
    still runs, with the right shapes, but computes something else. On 4-d feature maps (N, C, H, W) the autograd
    node's recorded input and output shapes show such an op: its channel count differs between input and output.
    """
    for cut in cuts.values():
        node = cut.dep.target
        if node.type != tp.ops.OPTYPE.ELEMENTWISE:
            continue
        change = channel_change(node.grad_fn)
        if change is not None:
            raise ValueError(
                f"cannot remove channels of {cut.roots}: their group passes through {type(node.grad_fn).__name__}, which maps "
                f"{change[0]} channels to {change[1]} (e.g. a shortcut padding channels with F.pad), and torch-pruning "
                "couples such channels one to one; leave these layers out of channel pruning"
            )


def channel_change(grad_fn: Any) -> tuple[int, int] | None:
    """(input channels, output channels) of an autograd node that changes the channel count of a 4-d tensor, else None.

    Reads the shapes autograd records (``_input_metadata``); where a PyTorch version lacks them, returns None.
    """
    out = getattr(grad_fn, "_input_metadata", None)
    if not out or len(out[0].shape) < 2:
        return None
    for producer, k in grad_fn.next_functions:
        metadata = getattr(producer, "_input_metadata", None)
        if not metadata:
            continue
        shape = metadata[k].shape
        if len(shape) == 4 and shape[1] > 1 and shape[1] != out[0].shape[1]:
            return int(shape[1]), int(out[0].shape[1])
    return None


def _check_cut_sizes(graph: Any, cuts: Mapping[tuple, _Cut], names: Mapping[int, str]) -> None:
    """``ValueError`` if a pruning operation gets indices beyond its layer's channels, or all of them."""
    for cut in cuts.values():
        size = _pruned_dim_size(graph, cut.dep)
        if size is None:
            continue
        target = _label(cut.dep.target, names)
        beyond = sorted(i for i in cut.idxs if not 0 <= i < size)
        if beyond:
            raise ValueError(
                f"torch-pruning maps the removal from {cut.roots} to channels {beyond[:5]} of {target}, which has {size}: "
                "its dependency graph is inconsistent for this model"
            )
        if len(cut.idxs) >= size:
            raise ValueError(f"removing these channels of {cut.roots} would leave {target} with no channel (all {size} removed)")


def _pruned_dim_size(graph: Any, dep: Any) -> int | None:
    """Size of the dimension ``dep``'s handler prunes (output or input channels), or None for shape-free ops."""
    if graph.is_out_channel_pruning_fn(dep.handler):
        return graph.get_out_channels(dep.target.module)
    if graph.is_in_channel_pruning_fn(dep.handler):
        return graph.get_in_channels(dep.target.module)
    return None


def _grouped_conv(module: object) -> bool:
    """Whether ``module`` is a grouped convolution other than a depthwise one (which Torch-Pruning handles)."""
    return isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels


def _check_grouped_convs(graph: Any, cuts: Mapping[tuple, _Cut], names: Mapping[int, str]) -> None:
    """``ValueError`` unless each grouped convolution loses as many input and output channels in every group.

    Anything else cannot be written as a grouped convolution: Torch-Pruning 1.6 would prune it anyway, and wrongly.
    """
    for cut in cuts.values():
        conv = cut.dep.target.module
        if not _grouped_conv(conv):
            continue
        size = _pruned_dim_size(graph, cut.dep)
        per_group = size // conv.groups
        counts = [sum(1 for i in cut.idxs if i // per_group == g) for g in range(conv.groups)]
        if len(set(counts)) > 1:
            raise ValueError(
                f"removing these channels of {cut.roots} would take {counts} channels from the {conv.groups} groups of "
                f"grouped convolution {_label(cut.dep.target, names)}; it needs the same number from every group"
            )


def _prune_grouped_conv_inputs(conv: nn.Conv2d, idxs: set[int]) -> None:
    """Remove input channels ``idxs`` of a grouped convolution, group by group (each group's rows keep their own columns).

    Torch-Pruning 1.6 keeps the same weight columns in every group, which is wrong unless all groups lose the same ones.
    """
    per_group_in = conv.in_channels // conv.groups
    per_group_out = conv.out_channels // conv.groups
    rows = []
    for g in range(conv.groups):
        keep = [j for j in range(per_group_in) if g * per_group_in + j not in idxs]
        rows.append(conv.weight.detach()[g * per_group_out:(g + 1) * per_group_out, keep])
    conv.weight = nn.Parameter(torch.cat(rows), requires_grad=conv.weight.requires_grad)
    conv.in_channels -= len(idxs)


def _label(node: Any, names: Mapping[int, str]) -> str:
    """The model's name for a graph node's module, else Torch-Pruning's name for the op."""
    name = names.get(id(node.module))
    return f"layer {name!r}" if name is not None else str(node.name)


def _apply(tp: ModuleType, graph: Any, model: nn.Module, cut: _Cut) -> None:
    """Run one merged pruning operation; a bare ``nn.Parameter`` comes back as a new one, put in the old one's place."""
    node = cut.dep.target
    if _grouped_conv(node.module) and graph.is_in_channel_pruning_fn(cut.dep.handler):
        _prune_grouped_conv_inputs(node.module, cut.idxs)
        return
    result = cut.dep(sorted(cut.idxs))
    if node.type == tp.ops.OPTYPE.PARAMETER:
        _replace_parameter(model, node.module, result)
        node.module = result


def _replace_parameter(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """Set the attribute holding ``old`` (found by identity) to ``new``."""
    name = next(name for name, p in model.named_parameters() if p is old)
    owner_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(owner_name), attribute, new)


class _ChannelMismatch(Exception):
    """Raised from a forward pre-hook when a layer gets a different channel count than it was pruned to."""


def _check_runs(pruned: nn.Module, example: torch.Tensor, expected: object) -> None:
    """``ValueError`` unless the pruned copy runs on ``example`` and gives outputs of the original's shapes."""
    hooks = [m.register_forward_pre_hook(_channel_hook(name)) for name, m in pruned.named_modules() if _expected_channels(m)]
    try:
        with torch.no_grad():
            got = _shapes(pruned(example))
    except _ChannelMismatch as err:
        raise ValueError(f"the pruned model is inconsistent: {err}") from None
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"the pruned model fails on the example input: {first_line}") from err
    finally:
        for hook in hooks:
            hook.remove()
    if got != expected:
        raise ValueError(f"the pruned model's output shapes {got} differ from the original's {expected}")


def _expected_channels(module: nn.Module) -> int | None:
    """The input channels a channel-bearing layer expects (in dimension 1, or the last for Linear), else None."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    return None


def _channel_hook(name: str) -> Callable[[nn.Module, tuple], None]:
    """A forward pre-hook raising ``_ChannelMismatch`` naming layer ``name`` when its input has the wrong channel count."""

    def hook(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        got = x.shape[-1] if isinstance(module, nn.Linear) else x.shape[1]
        if got != _expected_channels(module):
            raise _ChannelMismatch(f"layer {name!r} expects {_expected_channels(module)} input channels but gets {got}")

    return hook


def _shapes(output: object) -> object:
    """The shapes of a model output's tensors, in the output's tuple/list/dict structure."""
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (tuple, list)):
        return tuple(_shapes(o) for o in output)
    if isinstance(output, dict):
        return {k: _shapes(v) for k, v in output.items()}
    return output


# ----------------------------------------------------------------------------------------------------------- export


def save_exported(model: nn.Module, example: torch.Tensor, directory: str | os.PathLike) -> dict[str, Path]:
    """Write ``model.pt2`` and ``model.onnx`` into ``directory``, each to a temporary name then renamed.

    ``model.pt2``: ``torch.export.export`` + ``torch.export.save``; ``torch.export.load(path).module()`` runs it with
    PyTorch alone (its format unpickles no user classes). ``model.onnx``: the dynamo-based ``torch.onnx.export``
    (``dynamo=True``, via onnxscript), given the same exported program. PyTorch 2.9+ makes it the default and deprecates
    the TorchScript exporter ("will be removed"); it works offline. Weights are embedded (``external_data=False``) so the
    file is one self-contained file that can be renamed, which limits it to protobuf's 2 GB.
    The batch dimension is dynamic unless the model fixes it (``Dim.AUTO``; a batch of 1 is traced as 2, since
    export would specialise a size-1 dimension). Before the rename, onnxruntime runs the ONNX file on ``example``:
    the largest absolute difference from PyTorch's outputs, divided by max(1, largest |output|), must be at most 1e-4.
    That is absolute for outputs of order 1 (logits), relative for large ones: float32 rounding differences between
    the two runtimes scale with the magnitude of the values, and a purely relative test fails on outputs near zero.
    Raises ``RuntimeError`` if the check fails, ``UserError`` if onnx, onnxscript or onnxruntime is missing.
    """
    if model.training:
        raise ValueError("export a model in eval mode: call model.eval() first")
    onnxruntime = require_onnx()
    directory = Path(directory)
    example = example.contiguous()  # a strided view (e.g. a crop) makes torch.export add a guard the ONNX exporter fails on
    program = _export_program(model, example)
    paths = {"torch_export": directory / "model.pt2", "onnx": directory / "model.onnx"}
    atomic_write(paths["torch_export"], lambda tmp: _save_program(program, tmp))
    with torch.no_grad():
        reference = _tensors(model(example))
    atomic_write(paths["onnx"], lambda tmp: _write_checked_onnx(program, example, reference, tmp, onnxruntime))
    return paths


def require_onnx() -> ModuleType:
    """Import the ONNX exporter's dependencies and return ``onnxruntime``, or raise ``UserError`` naming the extra."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo-based exporter needs it)
    except ImportError as err:
        raise UserError(f"the ONNX export needs onnx, onnxscript and onnxruntime ({err.name} is missing): {INSTALL_CHANNELS}") from err
    return onnxruntime


def _save_program(program: torch.export.ExportedProgram, path: str) -> None:
    """``torch.export.save`` through a buffer: given a file name, it warns unless the name ends in ``.pt2``."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    Path(path).write_bytes(buffer.getbuffer())


def _write_checked_onnx(
    program: torch.export.ExportedProgram, example: torch.Tensor, reference: list[torch.Tensor], path: str, onnxruntime: ModuleType
) -> None:
    """Write the ONNX file to ``path`` and raise ``RuntimeError`` unless onnxruntime reproduces ``reference`` on ``example``."""
    torch.onnx.export(program, (example,), path, dynamo=True, external_data=False, input_names=["input"], verbose=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": example.detach().cpu().numpy()})
    if len(outputs) != len(reference):
        raise RuntimeError(f"the ONNX model gives {len(outputs)} outputs, PyTorch {len(reference)}")
    for i, (got, want) in enumerate(zip(outputs, reference)):
        want = want.detach().cpu()
        error = (torch.from_numpy(got) - want).abs().max().item() / max(1.0, want.abs().max().item())
        if not error <= ONNX_TOLERANCE:
            raise RuntimeError(f"the ONNX model's output {i} differs from PyTorch's by {error:.3g} (scaled), more than {ONNX_TOLERANCE}")


def _tensors(output: object) -> list[torch.Tensor]:
    """A model output's tensors in the order the exporters flatten them (tensor, or tuple/list of tensors)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    raise TypeError(f"save_exported supports tensor or tuple/list outputs, got {type(output).__name__}")
