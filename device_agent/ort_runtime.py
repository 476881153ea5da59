"""The ONNX Runtime on-device training API, reached without importing torch.

``import onnxruntime.training`` imports torch (training/__init__ -> optim), and
even ``import onnxruntime`` probes ``onnxruntime.training.ortmodule`` (and so
torch) when torch happens to be installed. The device agent therefore talks to
the compiled classes in ``onnxruntime.capi._pybind_state`` directly, and imports
onnxruntime with torch hidden so a device that has torch installed for other
reasons still does not pay its ~300 MB of RSS.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from device_agent.import_guard import ModuleBlocker


# onnxruntime's import probes ``onnxruntime.training.ortmodule``, whose package imports
# onnx and torch; hidden while onnxruntime initialises, the probe fails cleanly as on a device.
_HIDDEN = ("torch", "onnxruntime.training")


def _import_onnxruntime() -> ModuleType:
    if "onnxruntime" in sys.modules or "torch" in sys.modules:
        import onnxruntime

        return onnxruntime
    finder = ModuleBlocker(_HIDDEN, reason="is hidden from the fedge device agent")
    sys.meta_path.insert(0, finder)
    try:
        import onnxruntime
    finally:
        sys.meta_path.remove(finder)
    return onnxruntime


ort = _import_onnxruntime()
ort.set_default_logger_severity(3)
from onnxruntime.capi import _pybind_state as _C  # noqa: E402
from onnxruntime.capi.onnxruntime_inference_collection import OrtValue  # noqa: E402


def session_options(threads: int | None) -> Any:
    """Session options with ``threads`` intra-op threads (None: ORT's default, one per core)."""
    opts = _C.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    return opts


def _ort_values(arrays: Sequence[np.ndarray]) -> tuple[Any, list[Any]]:
    # Wrapping numpy buffers as OrtValues ourselves is ~20% faster per step for small
    # models than handing numpy arrays to the pybind layer (measured, bench/train.py).
    vec = _C.OrtValueVector()
    vec.reserve(len(arrays))
    keep = []
    for a in arrays:
        value = OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
        keep.append(value)
        vec.push_back(value._ortvalue)
    # OrtValues from numpy alias the numpy buffers: the caller keeps `keep` alive for the call
    return vec, keep


class TrainingSession:
    """One ORT artifact set: a checkpoint state, a training module and its optimizer."""

    def __init__(
        self,
        *,
        training_model: Path,
        eval_model: Path,
        optimizer_model: Path,
        checkpoint: Path,
        threads: int | None = None,
    ) -> None:
        self._options = session_options(threads)
        self._device = _C.OrtDevice(_C.OrtDevice.cpu(), _C.OrtDevice.default_memory(), 0)
        self.state = _C.load_checkpoint(os.fspath(checkpoint))
        self._module = _C.Module(os.fspath(training_model), self.state, os.fspath(eval_model), self._device, self._options)
        self._optimizer = _C.Optimizer(os.fspath(optimizer_model), self.state, self._device, self._options)

    @property
    def learning_rate(self) -> float:
        """Current optimizer learning rate."""
        return float(self._optimizer.get_learning_rate())

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        self._optimizer.set_learning_rate(float(value))

    def train_step(self, inputs: Sequence[np.ndarray]) -> float:
        """Forward, backward and one optimizer step; returns the training loss."""
        fetches = _C.OrtValueVector()
        values, _keep = _ort_values(inputs)
        self._module.train_step_with_ort_values(values, fetches)
        self._optimizer.optimizer_step()
        self._module.lazy_reset_grad()
        return float(fetches[0].numpy())

    def eval_step(self, inputs: Sequence[np.ndarray]) -> tuple[float, np.ndarray]:
        """Loss and model output (logits) without updating anything."""
        fetches = _C.OrtValueVector()
        values, _keep = _ort_values(inputs)
        self._module.eval_step_with_ort_values(values, fetches)
        return float(fetches[0].numpy()), fetches[1].numpy()

    def has_parameter(self, name: str) -> bool:
        """Whether the checkpoint holds a parameter called ``name``."""
        return bool(self.state.has_parameter(name))

    def get_parameter(self, name: str) -> np.ndarray:
        """A copy of parameter ``name`` as a numpy array."""
        return np.array(self.state.get_parameter(name).data.numpy(), copy=True)

    def set_parameter(self, name: str, value: np.ndarray) -> None:
        """Overwrite parameter ``name`` in place (shape and dtype must match)."""
        self.state.copy_parameter_from(name, OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))._ortvalue)

    def save(self, path: Path, *, include_optimizer_state: bool = True) -> None:
        """Write the checkpoint (parameters and, by default, optimizer moments) to ``path``."""
        _C.save_checkpoint(self.state, os.fspath(path), include_optimizer_state)
