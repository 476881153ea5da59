"""Portable training graphs: a whole training step as a standard-ops ONNX graph (host side, needs torch).

The device runs them with a plain ``InferenceSession`` (``device_agent.training_backends.portable``),
on any onnxruntime >= 1.19 including aarch64 and armhf, where onnxruntime-training does not exist.
"""

from sdk.portable_graph.builder import PortablePlan, build_portable_graphs
from sdk.portable_graph.support import ORT_TRAINING_REFUSED, SUPPORTED_LAYERS, UnsupportedModelError, check_model_supported

__all__ = ["ORT_TRAINING_REFUSED", "SUPPORTED_LAYERS", "PortablePlan", "UnsupportedModelError", "build_portable_graphs",
           "check_model_supported"]
