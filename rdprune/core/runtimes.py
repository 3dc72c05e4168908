"""What runs the model whose latency a budget counts, and how it is timed there.

A :class:`Runtime` turns a torch model or an exported file into a callable of one forward pass,
times callables interleaved (:func:`rdprune.core.timing.interleaved_samples`) under its thread
setting, and tells a latency table what it runs per layer. Built in (names in
:data:`rdprune.registry.RUNTIMES`):

* ``torch``: PyTorch eager in this process, on the latency device; the exported file it runs is
  ``model.pt2`` (``torch.export.load(path).module()``). Per-layer tables use ``torch.nn.functional``.
* ``onnxruntime``: ONNX Runtime's CPU execution provider on the model exported to ONNX, with
  ``threads`` intra-op threads, one inter-op thread, sequential execution and a stated graph
  optimisation level (``disable``, ``basic``, ``extended``, ``all``). Per-layer tables time
  single-layer graphs built with ``onnx.helper``: a convolution with a bias (BatchNorm folds into
  it) and, where the exported model has them after the layer, the residual addition and the ReLU
  (fused into the convolution where the widths allow it, separate nodes where they do not).

A GPU runtime (TensorRT, ONNX Runtime's CUDA provider) is a subclass registered under a new name,
where it can be tested. :meth:`Runtime.key` is what a latency table measured in it is keyed by.
"""
from __future__ import annotations

import functools
import logging
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from rdprune import registry
from rdprune.core.timing import LayerShape, interleaved_samples, torch_threads
from rdprune.errors import UserError

log = logging.getLogger(__name__)

ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
"""ONNX Runtime's graph optimisation levels by the name a config gives them."""
_OPSET = 17
_IR_VERSION = 8
_OVERHEAD_REPEATS = 200


class Runtime(ABC):
    """One way to run a model: ``threads`` (None: the runtime's default), ``device``, ``optimization`` (runtime-specific)."""

    name: ClassVar[str]
    separate_layers: ClassVar[bool] = False
    """Whether a latency table times layers through :meth:`layer_calls` (True) or inside the model (torch)."""
    file_format: ClassVar[str]
    """The exported file this runtime runs: ``torch_export`` (model.pt2) or ``onnx`` (model.onnx)."""

    def __init__(self, threads: int | None = None, device: torch.device | str = "cpu", optimization: str | None = None):
        self.threads, self.device, self.optimization = threads, torch.device(device), optimization

    def key(self) -> dict[str, object]:
        """What a latency table measured in this runtime is keyed by (with the batch)."""
        return {"runtime": self.name, "threads": self.threads, "optimization": self.optimization, "device": str(self.device)}

    def describe(self) -> str:
        extra = f", optimisation {self.optimization}" if self.optimization else ""
        return f"{self.name} on {self.device}, {self.threads or 'default'} thread(s){extra}"

    @classmethod
    def require(cls) -> None:
        """Raise ``UserError`` (one line) if this runtime cannot be used on this machine."""

    def check_model(self, model: nn.Module, example: torch.Tensor, shapes: Mapping[str, LayerShape]) -> None:
        """Raise ``UserError`` (one line) if this runtime cannot run ``model`` or one of its tabulated layers."""

    @abstractmethod
    def model_call(self, model: nn.Module, example: torch.Tensor) -> Callable[[], object]:
        """One forward pass of ``model`` on ``example`` as this runtime runs it (exported first where it needs a file)."""

    @abstractmethod
    def file_call(self, path: str | Path, example: torch.Tensor) -> Callable[[], object]:
        """One forward pass of the exported file ``path`` (this runtime's :attr:`file_format`) on ``example``."""

    def layer_calls(self, shape: LayerShape, batch: int, kept_in: int, outs: Sequence[int], groups: int,
                    activation: bool, residual: bool = False) -> list[Callable[[], object]] | None:
        """One call per kept-out count of a layer keeping ``kept_in`` inputs (followed by a residual addition and a ReLU
        where the model has them), as this runtime runs the layer; None: the table's ``torch.nn.functional`` calls are
        what it runs."""
        return None

    def call_overhead(self) -> float:
        """Seconds one timed call costs beyond its work (subtracted from each per-layer time); 0 where the table's
        dense pass already measures the layers inside the model."""
        return 0.0

    def samples(self, fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 3) -> list[list[float]]:
        """Seconds of ``repeats`` calls of each of ``fns``, interleaved (round robin), under this runtime's threads."""
        with torch_threads(self.threads), torch.inference_mode():
            return interleaved_samples(fns, repeats, warmup, self.device)

    def medians(self, fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 3) -> list[float]:
        return [statistics.median(s) for s in self.samples(fns, repeats, warmup)]

    def measure(self, models: Sequence[nn.Module], example: torch.Tensor, repeats: int, warmup: int = 3) -> list[float]:
        """Median seconds of one forward pass of each model in this runtime, timed interleaved."""
        return self.medians([self.model_call(m, example) for m in models], repeats, warmup)


class TorchRuntime(Runtime):
    """PyTorch eager, in this process (the latency tables time the layers inside the model, see ``LatencyTable``)."""

    name = "torch"
    file_format = "torch_export"

    def __init__(self, threads: int | None = None, device: torch.device | str = "cpu", optimization: str | None = None):
        super().__init__(threads, device, None)  # eager PyTorch has no graph optimisation level

    def model_call(self, model: nn.Module, example: torch.Tensor) -> Callable[[], object]:
        model = model.to(self.device).eval()
        return functools.partial(model, example.to(self.device))

    def file_call(self, path: str | Path, example: torch.Tensor) -> Callable[[], object]:
        module = torch.export.load(str(path)).module().to(self.device)
        return functools.partial(module, example.to(self.device))


def _onnxruntime() -> ModuleType:
    try:
        import onnxruntime
    except ImportError as err:
        raise UserError("latency.runtime onnxruntime needs the onnxruntime package, which is not installed: "
                        "pip install 'rdprune[channels]', or set latency.runtime torch") from err
    return onnxruntime


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class OnnxRuntime(Runtime):
    """ONNX Runtime, CPU execution provider: the exported ONNX graph, and single-layer ONNX graphs for the tables."""

    name = "onnxruntime"
    file_format = "onnx"
    separate_layers = True

    def __init__(self, threads: int | None = None, device: torch.device | str = "cpu", optimization: str | None = "all"):
        optimization = optimization or "all"
        if optimization not in ORT_LEVELS:
            raise ValueError(f"unknown ONNX Runtime optimisation level {optimization!r}: choose one of {', '.join(ORT_LEVELS)}")
        super().__init__(threads, device, optimization)
        if self.device.type != "cpu":
            raise UserError(f"latency.runtime onnxruntime measures with its CPU execution provider; latency.device is "
                            f"{self.device.type}: set latency.device cpu (a GPU runtime is not built in)")

    @classmethod
    def require(cls) -> None:
        _onnxruntime()

    def session_options(self) -> object:
        """The session options every timing uses: they are what a deployment should set to see the same speed."""
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or 0
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[self.optimization])
        options.log_severity_level = 3
        return options

    def session(self, model: bytes | str | Path, profile_dir: str | Path | None = None) -> object:
        """A session with :meth:`session_options`; with ``profile_dir``, profiled, its profile written there."""
        ort = _onnxruntime()
        source = str(model) if isinstance(model, Path) else model
        options = self.session_options()
        if profile_dir is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(profile_dir) / "profile")
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    @staticmethod
    def _call(session: object, example: torch.Tensor | np.ndarray) -> Callable[[], object]:
        x = example.detach().cpu().numpy() if isinstance(example, torch.Tensor) else example
        return functools.partial(session.run, None, {session.get_inputs()[0].name: np.ascontiguousarray(x)})

    def model_call(self, model: nn.Module, example: torch.Tensor) -> Callable[[], object]:
        example = example.cpu()
        return self._call(self.session(export_onnx(model.cpu().eval(), example)), example)

    def file_call(self, path: str | Path, example: torch.Tensor) -> Callable[[], object]:
        return self._call(self.session(Path(path)), example)

    def check_model(self, model: nn.Module, example: torch.Tensor, shapes: Mapping[str, LayerShape]) -> None:
        for name, s in shapes.items():
            try:
                self.layer_calls(s, 1, s.in_channels, [s.out_channels], s.groups, False)[0]()
            except Exception as exc:  # onnxruntime raises its own exception types
                raise UserError(f"latency.runtime onnxruntime cannot run layer {name} ({s.kind}): {_first_line(exc)}") from exc
        try:
            self.model_call(model, example[:1])()
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"latency.runtime onnxruntime cannot run the model exported to ONNX: {_first_line(exc)}") from exc

    def layer_calls(self, shape: LayerShape, batch: int, kept_in: int, outs: Sequence[int], groups: int,
                    activation: bool, residual: bool = False) -> list[Callable[[], object]]:
        """Sessions of single-layer graphs, all on one random input: a Conv (with bias: BatchNorm folds into it) or a
        Gemm, then the addition of a residual input where ``residual`` and a Relu where ``activation``: ONNX Runtime
        fuses both into the convolution where the widths allow it, and runs them apart where they do not."""
        rng = np.random.default_rng(0)
        if shape.kind == "linear":
            x = rng.standard_normal((batch * shape.in_hw[0] * shape.in_hw[1], kept_in), dtype=np.float32)
        else:
            x = rng.standard_normal((batch, kept_in, *shape.in_hw), dtype=np.float32)
        calls = []
        for o in outs:
            feed = {"x": x}
            if residual:
                feed["r"] = rng.standard_normal((batch, o, *shape.out_hw), dtype=np.float32)
            boundary = (kept_in * shape.in_hw[0] * shape.in_hw[1], o * shape.out_hw[0] * shape.out_hw[1])
            calls.append(ProfiledLayerCall(self, layer_graph(shape, kept_in, o, groups, activation, rng, residual), feed, boundary))
        return calls

    def inside_times(self, model: nn.Module, example: torch.Tensor, shapes: Mapping[str, LayerShape], repeats: tuple[int, int],
                     budget_s: float, warmup: int = 2) -> tuple[float, dict[str, float]]:
        """Median seconds of the exported model, and of each layer's node inside it, as ONNX Runtime runs them.

        Plain runs alternate with runs of a profiling session of the same graph (ONNX Runtime's per-node times);
        each convolution or Gemm node (fused with its BatchNorm, activation or residual addition, as optimised)
        is matched to the first layer of ``shapes``, in call order, with its weight shape (a Gemm whose weight the
        profile omits: with its input and output widths). A layer that no node matches is left out of the result.
        ``repeats`` (least, most) rounds of one plain and one profiled run, as many as ``budget_s`` allows.
        """
        import json
        import tempfile

        example = example.cpu()
        data = export_onnx(model.cpu().eval(), example)
        plain = self._call(self.session(data), example)
        with tempfile.TemporaryDirectory(prefix="rdprune-ort-profile-") as tmp:
            profiled = self.session(data, tmp)
            run = self._call(profiled, example)
            t0 = time.perf_counter()
            plain()
            price = 2 * (time.perf_counter() - t0)
            rounds = int(min(repeats[1], max(repeats[0], budget_s / price - warmup)))
            plain_s = []
            for r in range(warmup + rounds):
                for use_profile in ((True, False) if r % 2 else (False, True)):
                    if use_profile:
                        run()
                    else:
                        plain_s.append(interleaved_samples([plain], 1, 0, self.device)[0][0])
            events = json.loads(Path(profiled.end_profiling()).read_text())
        runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][warmup:]
        nodes = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]
        per_run = [[e for e in nodes if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]] for r in runs]
        per_run = [p for p in per_run if len(p) == len(per_run[0])]
        inside: dict[str, float] = {}
        remaining = list(shapes.items())
        for k, node in enumerate(per_run[0] if per_run else []):
            args = node.get("args", {})
            if args.get("op_name") not in ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul"):
                continue
            inputs = [list(next(iter(t.values()))) for t in args.get("input_type_shape", [])]
            outputs = [list(next(iter(t.values()))) for t in args.get("output_type_shape", [])]
            weight = inputs[1] if len(inputs) > 1 else None
            match = next((i for i, (_, s) in enumerate(remaining) if weight in _weight_shapes(s)), None)
            if match is None and args.get("op_name") != "Conv" and inputs and outputs:
                widths = [inputs[0][-1], outputs[0][-1]]
                match = next((i for i, (_, s) in enumerate(remaining) if s.kind == "linear"
                              and widths == [s.in_channels, s.out_channels]), None)
            if match is None:
                continue
            name, _ = remaining.pop(match)
            inside[name] = statistics.median(p[k]["dur"] for p in per_run) * 1e-6
        return statistics.median(plain_s[warmup:]), inside

    def op_times(self, model: nn.Module, example: torch.Tensor, runs: int = 15, warmup: int = 3) -> dict[str, float]:
        """Median seconds per run that each kind of node (``Conv``, ``FusedConv``, ``ReorderOutput``, ``Add``...) of the
        exported model takes, from ONNX Runtime's profile: where a pruned model's time goes that its layers' do not explain."""
        import json
        import tempfile

        example = example.cpu()
        with tempfile.TemporaryDirectory(prefix="rdprune-ort-profile-") as tmp:
            session = self.session(export_onnx(model.cpu().eval(), example), tmp)
            run = self._call(session, example)
            for _ in range(warmup + runs):
                run()
            events = json.loads(Path(session.end_profiling()).read_text())
        per_run = profile_runs(events)[warmup:]
        ops = sorted({op for totals in per_run for op in totals})
        return {op: statistics.median(t.get(op, 0.0) for t in per_run) for op in ops}

    def call_overhead(self) -> float:
        """Median seconds of running a one-element Identity graph: ONNX Runtime's fixed cost of one ``run``."""
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "overhead",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        call = self._call(self.session(_serialise(graph)), np.zeros(1, np.float32))
        return self.medians([call], _OVERHEAD_REPEATS, 20)[0]


def profile_runs(events: list[dict]) -> list[dict[str, float]]:
    """Per run of an ONNX Runtime profile (its JSON events), the seconds each kind of node took."""
    spans = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]
    per_run = []
    for span in spans:
        totals: dict[str, float] = {}
        for e in nodes:
            if span["ts"] <= e["ts"] <= span["ts"] + span["dur"]:
                op = e.get("args", {}).get("op_name", "?")
                totals[op] = totals.get(op, 0.0) + e["dur"] * 1e-6
        per_run.append(totals)
    return per_run


PLAIN, BLOCKED, BLOCKED_FROM_PLAIN = 0, 1, 2
"""A layer's memory layout in ONNX Runtime, as its single-layer graph shows it: ``PLAIN`` (NCHW: no reorders),
``BLOCKED`` (the blocked NCHWc layout: reorders into and out of it) or ``BLOCKED_FROM_PLAIN`` (blocked output read
from a plain input, as a convolution with fewer than a block of input channels does: a reorder out of it only)."""


class LayerKernels(NamedTuple):
    """What a single-layer graph's profile says: the median seconds of the layer's own nodes per run (without the
    reorders its boundary needs), their kinds joined by '+', its layout (:data:`PLAIN`...), and the seconds its
    reorders took per channel x pixel they moved (None where it ran none)."""

    seconds: float
    path: str
    layout: int
    reorder_s: float | None


class ProfiledLayerCall:
    """One single-layer graph's session, profiled: calling it runs the layer once; :meth:`kernels` then gives what the
    table keeps, the median time of its nodes other than the reorders into and out of ONNX Runtime's blocked layout
    (which a graph of one layer needs at its boundary and the model runs only where two layers' layouts differ), the
    kernel path (the node kinds) that ran it, the layout it ran in, and what its reorders cost per element moved.
    ``boundary`` is (input, output) channels x pixels per sample."""

    def __init__(self, runtime: OnnxRuntime, graph: bytes, feed: dict[str, np.ndarray], boundary: tuple[int, int]):
        import shutil
        import tempfile
        import weakref

        self._dir = tempfile.mkdtemp(prefix="rdprune-ort-layer-")
        weakref.finalize(self, shutil.rmtree, self._dir, True)  # the profile's folder goes with the call
        self.session = runtime.session(graph, self._dir)
        self.feed, self.boundary = feed, boundary

    def __call__(self) -> object:
        return self.session.run(None, self.feed)

    def kernels(self) -> LayerKernels:
        """The profile's summary (:class:`LayerKernels`); ends the profile."""
        import json
        import shutil

        path = Path(self.session.end_profiling())
        try:
            runs = profile_runs(json.loads(path.read_text()))
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
        own = [{op: t for op, t in run.items() if not op.startswith("Reorder")} for run in runs]
        reads, writes = (any(op in run for run in runs) for op in ("ReorderInput", "ReorderOutput"))
        layout = (BLOCKED if reads else BLOCKED_FROM_PLAIN) if writes else PLAIN
        moved = self.boundary[0] * reads + self.boundary[1] * writes
        reorder = statistics.median(sum(t for op, t in run.items() if op.startswith("Reorder")) for run in runs)
        return LayerKernels(statistics.median(sum(run.values()) for run in own), "+".join(sorted({op for run in own for op in run})),
                            layout, reorder / moved if moved else None)


def _serialise(graph: object) -> bytes:
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = _IR_VERSION
    return model.SerializeToString()


def layer_graph(shape: LayerShape, kept_in: int, kept_out: int, groups: int, activation: bool,
                rng: np.random.Generator | None = None, residual: bool = False) -> bytes:
    """A serialised ONNX model of one layer keeping (kept_in, kept_out) channels:
    ``x -> Conv|Gemm [-> Add r] [-> Relu] -> y`` (a residual input ``r`` only for a convolution)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = rng or np.random.default_rng(0)
    residual = residual and shape.kind != "linear"
    if shape.kind == "linear":
        x_shape, y_shape = ["n", kept_in], ["n", kept_out]
        weight = rng.standard_normal((kept_out, kept_in), dtype=np.float32)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["z"], transB=1)
    else:
        weight = rng.standard_normal((kept_out, kept_in // groups, *shape.kernel_size), dtype=np.float32)
        x_shape, y_shape = ["n", kept_in, *shape.in_hw], ["n", kept_out, *shape.out_hw]
        node = helper.make_node("Conv", ["x", "w", "b"], ["z"], kernel_shape=list(shape.kernel_size),
                                strides=list(shape.stride), pads=[*shape.padding, *shape.padding],
                                dilations=list(shape.dilation), group=groups)
    nodes = [node]
    if residual:
        nodes.append(helper.make_node("Add", [nodes[-1].output[0], "r"], ["s"]))
    if activation:
        nodes.append(helper.make_node("Relu", [nodes[-1].output[0]], ["a"]))
    nodes[-1].output[0] = "y"
    bias = rng.standard_normal(kept_out, dtype=np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    if residual:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, y_shape))
    graph = helper.make_graph(nodes, f"{shape.kind}_{kept_in}_{kept_out}", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return _serialise(graph)


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` with a dynamic batch where the model allows it, else a batch fixed at ``example``'s.

    A batch of 1 is traced as 2 (export would specialise a size-1 dimension)."""
    dynamic = ({0: torch.export.Dim.AUTO},)
    if example.shape[0] > 1:
        return torch.export.export(model, (example,), dynamic_shapes=dynamic)
    program = torch.export.export(model, (torch.cat([example, example]),), dynamic_shapes=dynamic)
    if _batch_is_dynamic(program):
        return program
    return torch.export.export(model, (example,))


def _batch_is_dynamic(program: torch.export.ExportedProgram) -> bool:
    """Whether the exported program's (single) user input has a symbolic batch size."""
    user_inputs = set(program.graph_signature.user_inputs)
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs)
    return isinstance(placeholder.meta["val"].shape[0], torch.SymInt)


def export_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """``model`` as a serialised ONNX model (the dynamo-based exporter, input named ``input``, dynamic batch where
    the model allows it): the graph a deployment runs, exported as the run's ``model.onnx`` is."""
    example = example.contiguous()
    program = export_program(model.eval(), example)
    exported = torch.onnx.export(program, (example,), None, dynamo=True, external_data=False, input_names=["input"], verbose=False)
    return exported.model_proto.SerializeToString()


def _weight_shapes(shape: LayerShape) -> list[list[int]]:
    """The weight shapes an exported node of this layer may carry (a Gemm's either way round)."""
    if shape.kind == "linear":
        return [[shape.out_channels, shape.in_channels], [shape.in_channels, shape.out_channels]]
    return [[shape.out_channels, shape.in_channels // max(shape.groups, 1), *shape.kernel_size]]


def make_runtime(name: str, threads: int | None = None, device: torch.device | str = "cpu",
                 optimization: str | None = None) -> Runtime:
    """The runtime registered as ``name`` (``UserError`` if it is unknown or unavailable here)."""
    if name not in registry.RUNTIMES:
        raise UserError(f"unknown latency.runtime {name!r}: choose one of {', '.join(registry.RUNTIMES.names())}")
    cls = registry.load(registry.RUNTIMES.get(name))
    cls.require()
    return cls(threads, device, optimization)


def runtime_of(latency: object, device: torch.device | str) -> Runtime:
    """The runtime a config's latency section names, on ``device``."""
    return make_runtime(getattr(latency, "runtime", "torch"), latency.threads, device, getattr(latency, "optimization", None))


@dataclass(frozen=True)
class GraphLinks:
    """How the layers of a model meet in its exported ONNX graph (BatchNorm folded into the convolutions).

    ``activations``: the layers whose node is followed by a ReLU; ``residuals``: the convolutions whose output is the
    first input of an addition (a residual connection, then possibly the ReLU). ONNX Runtime fuses both into the
    layer's node where the widths let it, and runs them as separate nodes where they do not. ``inputs``: per layer,
    the layers whose outputs reach its input through other nodes (ReLUs, pooling, a residual addition, which counts
    as the output of the layer it is fused into), with the spatial size (h, w) the tensor has where it arrives; a
    residual layer's second addend counts as an input at the layer's output size. Where two linked layers run in
    different layouts, ONNX Runtime reorders that tensor between them.
    """

    activations: frozenset[str]
    residuals: frozenset[str]
    inputs: Mapping[str, tuple[tuple[str, int, int], ...]]


def graph_links(model: nn.Module, example: torch.Tensor, shapes: Mapping[str, LayerShape]) -> GraphLinks:
    """:class:`GraphLinks` of ``model``: each Conv or Gemm node of its ONNX export matched, in order, to the first layer of
    ``shapes`` not yet matched with its weight shape."""
    import onnx

    graph = onnx.load_from_string(export_onnx(model.cpu().eval(), example.cpu())).graph
    dims = {init.name: list(init.dims) for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    remaining = list(shapes.items())
    layer_of: dict[str, str] = {}  # tensor -> the layer whose output it is
    data_in: dict[str, list[tuple[str, tuple[int, int]]]] = {}  # layer -> (tensor, size where it arrives)
    activations: set[str] = set()
    residuals: set[str] = set()
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        match = next((i for i, (_, s) in enumerate(remaining) if dims.get(node.input[1]) in _weight_shapes(s)), None)
        if match is None:
            continue
        name, shape = remaining.pop(match)
        data_in[name] = [(node.input[0], shape.in_hw)]
        out = node.output[0]
        layer_of[out] = name
        after = consumers.get(out, [])
        if node.op_type == "Conv" and len(after) == 1 and after[0].op_type == "Add" and after[0].input[0] == out:
            residuals.add(name)
            data_in[name].append((after[0].input[1], shape.out_hw))
            out = after[0].output[0]
            layer_of[out] = name
            after = consumers.get(out, [])
        if len(after) == 1 and after[0].op_type == "Relu":
            activations.add(name)

    def sources(tensor: str, seen: set[str]) -> list[str]:
        if tensor in layer_of:
            return [layer_of[tensor]]
        node = producer.get(tensor)
        if node is None or tensor in seen:  # a graph input or an initializer
            return []
        seen.add(tensor)
        return [layer for t in node.input if t not in dims for layer in sources(t, seen)]

    inputs = {}
    for name, tensors in data_in.items():
        links = {}
        for tensor, (h, w) in tensors:
            for layer in sources(tensor, set()):
                links.setdefault(layer, (layer, int(h), int(w)))
        inputs[name] = tuple(links.values())
    return GraphLinks(frozenset(activations), frozenset(residuals), inputs)
