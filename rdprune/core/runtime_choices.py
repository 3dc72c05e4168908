"""The runtimes a latency budget may be measured in, declared without importing torch or onnxruntime.

Each name maps to the import path of its :class:`rdprune.core.runtimes.Runtime` subclass, loaded
only when a run uses it. A GPU runtime (TensorRT, ONNX Runtime's CUDA provider) is added the same
way, as a plug-in, where it can be tested.
"""
from rdprune.registry import RUNTIMES

RUNTIMES.register("torch", "rdprune.core.runtimes:TorchRuntime")
RUNTIMES.register("onnxruntime", "rdprune.core.runtimes:OnnxRuntime")
