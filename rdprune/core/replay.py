"""Skip the part of an untraceable network that runs before a pruned layer, by replaying module outputs.

When ``torch.fx`` cannot trace a model (Hugging Face transformers branch on tensor shapes and
dtypes), the suffix of a layer cannot be cut out of a graph. Eager execution still orders the
work: a module whose call *ended* before the pruned layer was first called cannot depend on that
layer's output. So for each layer, the forward pass runs once unpruned with those modules'
outputs recorded, and then every pruning level re-runs the model with the largest such modules
answering from the record instead of computing (their inputs are ignored), while everything
after them runs for real.

What would make a replay wrong is refused: a module called more than once, or sharing a parameter
with the pruned layer (tied weights), is never replayed; and a pass that departs from the structure
the replay relies on raises :class:`UnsafeSuffix`, which sends that layer to the plain loop. Each
recording pass checks, for its batch, that every replayed module runs once and ends before the
pruned layer starts, that no operation reads the pruned layer's weights before that (a parent's
``F.linear(x, self.head.weight)``), and that no recorded tensor is changed in place afterwards;
each replayed pass, that no replayed module is called again or after the pruned layer (pruning
that changes the control flow) and no record is changed in place; and a unit's first replay must
reproduce the unpruned output. Control flow that changes what runs *after* the layer is simply
run, so it is measured as the plain loop measures it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from rdprune.core.suffix import UnsafeSuffix, tensor_version, tensors_in


@dataclass(frozen=True)
class _Call:
    start: int  # position of the call's entry in the forward pass's sequence of module entries and exits
    end: int


class ModuleReplay:
    """The call structure of ``model``'s forward pass, and the modules each pruned layer may replay."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.model = model
        self._names = {id(m): n for n, m in model.named_modules()}
        self._calls = self._trace_calls(example)

    def _trace_calls(self, x: torch.Tensor) -> dict[str, list[_Call]]:
        """Every module's calls (entry and exit positions) in one forward pass of ``x``."""
        events: list[tuple[str, str]] = []
        with self._hooks(lambda name: events.append(("in", name)), lambda name, _: events.append(("out", name))):
            self.model(x)
        calls: dict[str, list[_Call]] = {}
        open_calls: dict[str, list[int]] = {}
        for position, (kind, name) in enumerate(events):
            if kind == "in":
                open_calls.setdefault(name, []).append(position)
            else:
                calls.setdefault(name, []).append(_Call(open_calls[name].pop(), position))
        return calls

    @contextmanager
    def _hooks(self, entered, exited, names: set[str] | None = None) -> Iterator[None]:
        """Call ``entered(name)`` and ``exited(name, output)`` around every call of the modules ``names`` (None: all)."""
        handles = []
        for name, module in self.model.named_modules():
            if names is not None and name not in names:
                continue
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: entered(name)))
            handles.append(module.register_forward_hook(lambda m, a, out, name=name: exited(name, out)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def replayable(self, modules: tuple[nn.Module, ...]) -> list[str]:
        """The largest modules whose single call ends before any of ``modules`` is first called and
        that hold none of their parameters: what a pass with ``modules`` pruned may replay."""
        targets = [self._names[id(m)] for m in modules]
        if any(t not in self._calls for t in targets):
            return []  # a layer the forward pass never calls: nothing to save
        first = min(call.start for t in targets for call in self._calls[t])
        shared = {id(p) for m in modules for p in m.parameters()}
        chosen: list[str] = []
        for name, module in self.model.named_modules():
            calls = self._calls.get(name, [])
            if not name or len(calls) != 1 or calls[0].end >= first:
                continue
            if any(name == c or name.startswith(c + ".") for c in chosen):
                continue  # inside a module already chosen
            if any(id(p) in shared for p in module.parameters()):
                continue
            chosen.append(name)
        return chosen

    def record(self, x: torch.Tensor, names: list[str], modules: tuple[nn.Module, ...]) -> tuple[dict[str, object], object]:
        """The outputs of modules ``names`` in the unpruned forward pass of ``x``, and the model's output.

        Raises UnsafeSuffix where this pass does not have the structure ``replayable`` found: a module
        of ``names`` not called exactly once, or still running when one of ``modules`` (the pruned
        unit) is first called; a weight of ``modules`` read before they are first called (used
        functionally, as by a parent's ``F.linear(x, self.head.weight)``); a recorded tensor changed
        in place later in the pass.
        """
        wanted, outputs, versions, calls = set(names), {}, {}, dict.fromkeys(names, 0)
        unit = {self._names[id(m)] for m in modules}
        state = {"unit_started": False, "running": set()}

        def entered(name: str) -> None:
            if name in unit:
                if state["running"]:
                    raise UnsafeSuffix(f"{sorted(state['running'])[0]} is still running when the pruned layer is called")
                state["unit_started"] = True
            elif name in wanted:
                if state["unit_started"]:
                    raise UnsafeSuffix(f"{name} runs after the pruned layer on this batch")
                calls[name] += 1
                state["running"].add(name)

        def exited(name: str, out: object) -> None:
            if name in wanted:
                state["running"].discard(name)
                outputs[name] = out
                versions[name] = _versions(out)

        with self._hooks(entered, exited, wanted | unit), _WeightReads(modules, lambda: state["unit_started"]):
            result = self.model(x)
        for name, count in calls.items():
            if count != 1:
                raise UnsafeSuffix(f"{name} is called {count} times on this batch, not once")
        _check_unchanged(outputs, versions)
        return outputs, result

    def run(self, x: torch.Tensor, outputs: dict[str, object], modules: tuple[nn.Module, ...]) -> object:
        """The model's output on ``x`` with the modules in ``outputs`` answering from the record.

        Raises UnsafeSuffix when the pass no longer has the recorded structure (a replayed module
        called twice, or after the pruned unit ``modules`` started: its input may now depend on the
        pruning), or when a recorded tensor was changed in place (its next replay would be wrong).
        """
        named = dict(self.model.named_modules())
        versions = {name: _versions(out) for name, out in outputs.items()}
        own = {name: named[name].__dict__["forward"] for name in outputs if "forward" in named[name].__dict__}
        state = {"unit_started": False, "answered": set()}

        def answer(name: str, out: object):
            def forward(*args: object, **kwargs: object) -> object:
                if state["unit_started"] or name in state["answered"]:
                    raise UnsafeSuffix(f"{name} is called again, or after the pruned layer, once that layer is pruned")
                state["answered"].add(name)
                return out
            return forward

        def unit_entered(*_: object) -> None:
            state["unit_started"] = True

        handles = [m.register_forward_pre_hook(unit_entered) for m in modules]
        for name, out in outputs.items():
            named[name].forward = answer(name, out)
        try:
            result = self.model(x)
        finally:  # an instance-level forward another library set (accelerate's hooks) is put back
            for handle in handles:
                handle.remove()
            for name in outputs:
                if name in own:
                    named[name].forward = own[name]
                else:
                    del named[name].forward
        _check_unchanged(outputs, versions)
        return result


class _WeightReads(torch.overrides.TorchFunctionMode):
    """Raises UnsafeSuffix when an operation reads a parameter of ``modules`` before ``started()``:
    a computation the record would hold fixed although the pruned weight feeds it."""

    def __init__(self, modules: tuple[nn.Module, ...], started) -> None:
        super().__init__()
        self._params = {id(p) for m in modules for p in m.parameters()}
        self._started = started

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (not self._started() and not _metadata(func)
                and any(id(t) in self._params for t in tensors_in((args, kwargs)))):
            raise UnsafeSuffix("a weight of the pruned layer is read before the layer is called")
        return func(*args, **kwargs)


_METADATA_ATTRIBUTES = {"dtype", "shape", "device", "ndim", "layout", "is_cuda", "requires_grad", "is_sparse", "is_quantized",
                        "is_meta", "names"}
_METADATA_METHODS = {"size", "dim", "numel", "nelement", "stride", "is_contiguous", "element_size", "is_floating_point",
                     "get_device", "storage_offset", "data_ptr"}


def _metadata(func: object) -> bool:
    """Whether ``func`` reads only a tensor's metadata (``weight.dtype``, ``weight.shape``), not its values."""
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property of the tensor
        return getattr(getattr(func, "__self__", None), "__name__", "") in _METADATA_ATTRIBUTES
    return name in _METADATA_METHODS


def _versions(value: object) -> list[int]:
    return [tensor_version(t) for t in tensors_in(value)]


def _check_unchanged(outputs: dict[str, object], versions: dict[str, list[int]]) -> None:
    for name, out in outputs.items():
        if _versions(out) != versions[name]:
            raise UnsafeSuffix(f"the output of {name} is changed in place after it is computed")

