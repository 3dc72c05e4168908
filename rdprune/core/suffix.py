"""Re-run only the part of a traced network that one layer can affect (the layer's *suffix*).

The network is traced once with ``torch.fx`` (prunable layers kept as opaque module calls). For a
layer, the nodes downstream of it form its suffix; the values the suffix reads from outside
(its *boundary*) come from the unpruned forward pass, and every pruning level then re-runs the
suffix alone. Either the boundary is computed for one layer by running only its ancestors (the
*prefix*, :meth:`TracedNetwork.boundary_values`), or one :class:`ForwardWalker` per calibration
batch walks the unpruned forward pass once and serves the boundaries of many layers in graph
order (:meth:`TracedNetwork.boundary_from`), so the prefixes cost one forward pass in all.
"""
from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_arg
from torch.utils.flop_counter import FlopCounterMode


class UnsafeSuffix(RuntimeError):
    """Re-running this suffix would not reproduce the network (in-place updates of its inputs)."""


def tensor_version(value: object) -> int:
    """In-place modification counter of a tensor (-1 for anything else, which cannot change)."""
    return value._version if isinstance(value, torch.Tensor) else -1


_INPLACE_FUNCTIONS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.imatmul,
}


def _is_in_place(node: fx.Node, model: nn.Module) -> bool:
    """Whether ``node`` modifies its first argument (the usual in-place spellings)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True or (name.endswith("_") and not name.startswith("_"))
    if node.op == "call_module":
        return getattr(model.get_submodule(node.target), "inplace", False) is True
    return False


class _LeafTracer(fx.Tracer):
    """Keeps the given modules as ``call_module`` nodes even when they are user subclasses."""

    def __init__(self, leaves: Iterable[nn.Module]):
        super().__init__()
        self._leaf_ids = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._leaf_ids or super().is_leaf_module(m, module_qualified_name)


@dataclass(frozen=True)
class SuffixPlan:
    """What to run for one layer: ``prefix`` computes ``boundary``; ``suffix`` recomputes the output.

    ``suffix`` is empty when the layer cannot affect the output at all.
    """

    prefix: tuple[fx.Node, ...]
    boundary: frozenset[fx.Node]
    suffix: tuple[fx.Node, ...]
    prefix_release: dict[fx.Node, tuple[fx.Node, ...]]
    suffix_release: dict[fx.Node, tuple[fx.Node, ...]]
    reuse: dict[fx.Node, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    """Suffix nodes that may write their result into an argument's buffer (see :func:`_reuse_slots`)."""


_RELU = {torch.relu, F.relu}
_ADD = {operator.add, torch.add}


def _in_place_twin(node: fx.Node, model: nn.Module) -> tuple[str, tuple[int, ...]] | None:
    """``("relu", (0,))`` or ``("add", (0, 1))`` when ``node`` is an out-of-place ReLU or sum with
    an exact in-place twin (``relu_``, ``add_``: the same values, bit for bit), with the
    positions of the arguments whose buffer could take the result; None otherwise."""
    args, kwargs = node.args, dict(node.kwargs)
    if node.op == "call_function" and node.target in _RELU and len(args) == 1 and kwargs in ({}, {"inplace": False}):
        return "relu", (0,)
    if node.op == "call_method" and node.target == "relu" and len(args) == 1 and not kwargs:
        return "relu", (0,)
    if node.op == "call_module" and len(args) == 1 and not kwargs:
        module = model.get_submodule(node.target)
        if type(module) is nn.ReLU and not module.inplace:
            return "relu", (0,)
    if node.op == "call_function" and node.target in _ADD and len(args) == 2 and not kwargs:
        return "add", (0, 1)
    if node.op == "call_method" and node.target == "add" and len(args) == 2 and not kwargs:
        return "add", (0, 1)
    return None


def _reuse_slots(suffix: tuple[fx.Node, ...], model: nn.Module) -> dict[fx.Node, tuple[str, tuple[int, ...]]]:
    """Suffix nodes that may overwrite an argument instead of allocating their result.

    An argument qualifies when the suffix itself computed it (a module, function or method call)
    and this node is its only reader, so nothing can see the old values afterwards. What the
    graph cannot show (aliasing: a value that is a view of, or the same tensor as, a boundary
    value, a parameter or another live value) is checked on the tensors at run time
    (:meth:`TracedNetwork._execute_reusing`). Saves an allocation, and on machines where fresh
    memory costs page faults much of the time of the elementwise ops, at no change in the values.
    """
    inside = set(suffix)
    slots = {}
    for node in suffix:
        twin = _in_place_twin(node, model)
        if twin is None:
            continue
        kind, positions = twin
        # An item taken out of a tuple (``getitem``) is the same tensor as the tuple's element,
        # which other nodes may read: never overwritten.
        ok = tuple(i for i in positions if isinstance(node.args[i], fx.Node) and node.args[i] in inside
                   and node.args[i].op in ("call_module", "call_function", "call_method")
                   and node.args[i].target is not operator.getitem and len(node.args[i].users) == 1)
        if ok:
            slots[node] = (kind, ok)
    return slots


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def tensors_in(value: object) -> list[torch.Tensor]:
    """The tensors of a value, looking inside tuples, lists and dicts (nodes and modules can return those)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


def _release_after(nodes: tuple[fx.Node, ...], keep: Iterable[fx.Node]) -> dict[fx.Node, tuple[fx.Node, ...]]:
    """For each node, the values that no later node of ``nodes`` reads, so they can be freed then."""
    keep = set(keep)
    last_use: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        for inp in node.all_input_nodes:
            last_use[inp] = node
    release: dict[fx.Node, list[fx.Node]] = {n: [] for n in nodes}
    for value, user in last_use.items():
        if value not in keep:
            release[user].append(value)
    return {n: tuple(v) for n, v in release.items()}


class TracedNetwork:
    """A model traced by ``torch.fx`` that can run any subset of its graph on given values.

    Modules and parameters are looked up in the original model, so pruning a layer's weight in
    place is seen by every run. Raises whatever ``torch.fx`` raises when the model cannot be traced.
    """

    def __init__(self, model: nn.Module, leaves: Iterable[nn.Module]):
        before = set(vars(model))
        self.model = model
        self.graph = _LeafTracer(leaves).trace(model)
        # fx stores tensor constants on the traced root; keep them here instead of in the user's model.
        self._constants = {k: vars(model)[k] for k in set(vars(model)) - before}
        for k in self._constants:
            delattr(model, k)
        self.nodes = tuple(self.graph.nodes)
        self.placeholders = tuple(n for n in self.nodes if n.op == "placeholder")
        self.output = next(n for n in self.nodes if n.op == "output")
        self._position = {n: i for i, n in enumerate(self.nodes)}
        self._check_in_place()

    def _check_in_place(self) -> None:
        """The graph's edges miss in-place updates; refuse graphs where that changes what depends on what.

        An in-place node is harmless when nothing reads its input after it (``relu(inplace=True)``
        on a fresh value); otherwise later readers depend on it without an edge saying so.
        """
        for node in self.nodes:
            if _is_in_place(node, self.model) and node.args and isinstance(node.args[0], fx.Node):
                later = [u for u in node.args[0].users if self._position[u] > self._position[node]]
                if later:
                    raise ValueError(f"in-place {node.target} changes a value that {later[0].name} reads later")

    def _attr(self, target: str) -> object:
        if target in self._constants:
            return self._constants[target]
        obj: object = self.model
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def sources(self, module: nn.Module) -> list[fx.Node]:
        """Nodes through which ``module``'s weight enters the graph: its calls, or direct weight reads."""
        found = []
        for node in self.nodes:
            if node.op == "call_module" and self.model.get_submodule(node.target) is module:
                found.append(node)
            elif node.op == "get_attr" and self._attr(node.target) is module.weight:
                found.append(node)
        return found

    def plan(self, *modules: nn.Module) -> SuffixPlan:
        """Split the graph into what ``modules`` (pruned together) can affect and what they cannot."""
        downstream: set[fx.Node] = set()
        stack = [node for module in modules for node in self.sources(module)]
        while stack:
            node = stack.pop()
            if node not in downstream:
                downstream.add(node)
                stack.extend(node.users)
        if self.output not in downstream:
            return SuffixPlan((), frozenset(), (), {}, {})
        suffix = tuple(sorted(downstream, key=self._position.__getitem__))
        boundary = {inp for n in suffix for inp in n.all_input_nodes if inp not in downstream}
        needed: set[fx.Node] = set()
        stack = list(boundary)
        while stack:
            node = stack.pop()
            if node not in needed:
                needed.add(node)
                stack.extend(node.all_input_nodes)
        prefix = tuple(sorted(needed, key=self._position.__getitem__))
        return SuffixPlan(
            prefix=prefix,
            boundary=frozenset(boundary),
            suffix=suffix,
            prefix_release=_release_after(prefix, boundary),
            suffix_release=_release_after(suffix, (self.output,)),
            reuse=_reuse_slots(suffix, self.model),
        )

    def placeholder_values(self, x: torch.Tensor) -> dict[fx.Node, object]:
        values: dict[fx.Node, object] = {}
        for i, node in enumerate(self.placeholders):
            if i == 0:
                values[node] = x
            elif node.args:
                values[node] = node.args[0]
            else:
                raise ValueError(f"the model's forward needs argument {node.target!r} besides the input; curves feed one tensor")
        return values

    def execute(self, node: fx.Node, env: dict[fx.Node, object]) -> object:
        args = map_arg(node.args, env.__getitem__)
        kwargs = map_arg(node.kwargs, env.__getitem__)
        if node.op == "get_attr":
            return self._attr(node.target)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        if node.op == "call_module":
            return self.model.get_submodule(node.target)(*args, **kwargs)
        if node.op == "output":
            return args[0]
        raise AssertionError(f"unexpected fx node op {node.op!r}")

    def _protected_storages(self) -> set[int]:
        """Storages of the model's parameters, buffers and traced constants: never overwritten."""
        tensors = [*self.model.parameters(), *self.model.buffers(), *self._constants.values()]
        return {_storage(t) for t in tensors if isinstance(t, torch.Tensor)}

    def _execute_reusing(self, node: fx.Node, env: dict[fx.Node, object], slot: tuple[str, tuple[int, ...]],
                         protected: set[int]) -> object | None:
        """``node``'s value computed in place into one of its arguments (see :func:`_reuse_slots`),
        or None when no argument's tensor may be overwritten."""
        kind, positions = slot
        args = [env[a] if isinstance(a, fx.Node) else a for a in node.args]
        for i in positions:
            a = args[i]
            if type(a) is not torch.Tensor or a._base is not None or a.layout != torch.strided or a.requires_grad:
                continue
            where = _storage(a)
            # any other live value on the same storage (the same tensor handed on, a view, a
            # detached copy) may still be read
            if where in protected or any(_storage(t) == where
                                         for n, v in env.items() if n is not node.args[i] for t in tensors_in(v)):
                continue
            if kind == "relu":
                return torch.relu_(a)
            other = args[1 - i]
            if isinstance(other, bool) or not isinstance(other, (torch.Tensor, int, float)):
                continue
            if torch.result_type(a, other) != a.dtype:
                continue
            if isinstance(other, torch.Tensor) and (other.device != a.device or torch.broadcast_shapes(a.shape, other.shape) != a.shape):
                continue
            return a.add_(other)  # a + other == other + a, bit for bit
        return None

    def _run(
        self,
        nodes: tuple[fx.Node, ...],
        env: dict[fx.Node, object],
        release: dict[fx.Node, tuple[fx.Node, ...]],
        versions: dict[fx.Node, int] | None = None,
        reuse: dict[fx.Node, tuple[str, tuple[int, ...]]] | None = None,
        protected: set[int] | None = None,
    ) -> None:
        for node in nodes:
            if node.op != "placeholder":
                value = None
                if reuse and node in reuse:
                    value = self._execute_reusing(node, env, reuse[node], protected)
                env[node] = self.execute(node, env) if value is None else value
            if versions is not None and node in versions:
                versions[node] = tensor_version(env[node])
            for done in release[node]:
                env.pop(done, None)

    def boundary_values(self, plan: SuffixPlan, x: torch.Tensor) -> dict[fx.Node, object]:
        """Run the prefix on input ``x``; keep only what the suffix reads.

        Raises :class:`UnsafeSuffix` when an in-place operation changed a boundary value after it
        was computed: the suffix would then read something the original forward never showed it.
        """
        env = self.placeholder_values(x)
        produced = dict.fromkeys(plan.boundary, -1)
        self._run(plan.prefix, env, plan.prefix_release, produced)
        boundary = {n: env[n] for n in plan.boundary}
        if any(tensor_version(boundary[n]) != v for n, v in produced.items()):
            raise UnsafeSuffix("an in-place operation modifies a value the suffix reads")
        return boundary

    def walker(self, x: torch.Tensor) -> ForwardWalker:
        """A walker over the unpruned forward pass on input ``x`` (see :meth:`boundary_from`)."""
        return ForwardWalker(self, x)

    def boundary_from(self, walker: ForwardWalker, plan: SuffixPlan) -> dict[fx.Node, object]:
        """The boundary values of ``plan``, taken from ``walker``'s forward pass.

        The walker computes what the boundary needs and is not computed yet (restarting when a
        value it needs was already freed). The same in-place check as :meth:`boundary_values` applies: a value
        changed in place since it was computed raises :class:`UnsafeSuffix`.
        """
        return walker.serve(plan)

    def run_suffix(self, plan: SuffixPlan, boundary: dict[fx.Node, object], check: bool = True) -> object:
        """The network output recomputed from the boundary values with the current weights.

        Raises :class:`UnsafeSuffix` when the suffix modified a boundary value in place, since
        the next level would then start from altered values (``check=False`` skips that guard,
        for profiling it).
        """
        before = {n: tensor_version(v) for n, v in boundary.items()} if check else {}
        env = dict(boundary)
        protected = None
        if plan.reuse:
            protected = self._protected_storages()
            protected.update(_storage(t) for v in boundary.values() for t in tensors_in(v))
        self._run(plan.suffix, env, plan.suffix_release, reuse=plan.reuse, protected=protected)
        if any(tensor_version(boundary[n]) != v for n, v in before.items()):
            raise UnsafeSuffix("the suffix modifies one of its inputs in place")
        return env[self.output]

    def run_all(self, x: torch.Tensor) -> object:
        """The whole graph on ``x`` (to check that the trace reproduces the model)."""
        env = self.placeholder_values(x)
        self._run(self.nodes, env, _release_after(self.nodes, (self.output,)))
        return env[self.output]

    def node_flops(self, x: torch.Tensor) -> dict[fx.Node, int]:
        """FLOPs of every node on input ``x``, counted by ``torch.utils.flop_counter``."""
        env = self.placeholder_values(x)
        flops: dict[fx.Node, int] = {}
        for node in self.nodes:
            if node.op == "placeholder":
                flops[node] = 0
                continue
            with FlopCounterMode(display=False) as counter:
                env[node] = self.execute(node, env)
            flops[node] = int(counter.get_total_flops())
        return flops


class ForwardWalker:
    """The unpruned forward pass of one calibration batch, computed on demand.

    :meth:`serve` hands out one layer's boundary values, computing only the nodes they depend on
    that are not computed yet. Layers served in graph order thus share one forward pass. A value
    is freed once every node reading it has been computed (unless it is part of the boundary
    being served), so memory holds about what a forward pass holds at that point. A boundary value
    that was already freed (layers served out of order) makes the walker start afresh. Weights
    must be the unpruned ones whenever it computes.
    """

    def __init__(self, network: TracedNetwork, x: torch.Tensor):
        self.network = network
        self._x = x
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        self.env: dict[fx.Node, object] = self.network.placeholder_values(self._x)
        self.versions: dict[fx.Node, int] = {n: tensor_version(v) for n, v in self.env.items()}
        self.computed: set[fx.Node] = set(self.env)
        self._unread = {n: len(n.users) for n in self.network.nodes}  # readers not computed yet

    def restart(self) -> None:
        """Forget everything computed (e.g. after a suffix changed a value in place)."""
        self.restarts += 1
        self._start()

    def serve(self, plan: SuffixPlan) -> dict[fx.Node, object]:
        """Boundary values of ``plan`` from the unpruned forward pass (see :meth:`TracedNetwork.boundary_from`)."""
        if any(n in self.computed and n not in self.env for n in plan.boundary):
            self.restart()  # served out of graph order: a value it needs is gone
        keep = plan.boundary
        for node in [n for n in self.env if self._unread[n] == 0 and n not in keep]:
            del self.env[node]
        needed: set[fx.Node] = set()
        stack = [n for n in plan.boundary if n not in self.computed]
        while stack:
            node = stack.pop()
            if node not in needed and node not in self.computed:
                needed.add(node)
                stack.extend(node.all_input_nodes)
        for node in sorted(needed, key=self.network._position.__getitem__):
            self.env[node] = self.network.execute(node, self.env)
            self.versions[node] = tensor_version(self.env[node])
            self.computed.add(node)
            for inp in node.all_input_nodes:
                self._unread[inp] -= 1
                if self._unread[inp] == 0 and inp not in keep:
                    del self.env[inp]
        for n in plan.boundary:
            if n.op == "get_attr":  # a parameter or buffer, read afresh: restoring a pruned weight bumps its version
                self.env[n] = self.network._attr(n.target)
                self.versions[n] = tensor_version(self.env[n])
        boundary = {n: self.env[n] for n in plan.boundary}
        if any(tensor_version(v) != self.versions[n] for n, v in boundary.items()):
            raise UnsafeSuffix("an in-place operation modifies a value the suffix reads")
        return boundary
