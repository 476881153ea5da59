"""The ``ort-training`` backend: ONNX Runtime's on-device training API (onnxruntime-training 1.19).

Each artifact set has its own ``CheckpointState``, ``Module`` and
``Optimizer`` (ORT cannot share one state between two modules). Parameters a
set trains are copied into the other sets' states when training switches to
another set, so every set always trains on current values. Optimizer moments
are only reachable through checkpoint files, which ``ort_checkpoint`` reads
and writes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle.archive import TrainingBundle
from device_agent.bundle.manifest import ANCHOR_PREFIX, ArtifactSet, ArtifactSetName, OptimizerKind
from device_agent.training_backends.base import BackendName, TrainingBackend
from device_agent.training_backends.ort_checkpoint import OrtCheckpoint, read_checkpoint, write_checkpoint
from device_agent.training_backends.runtime import BackendUnavailableError, has_training_api, onnxruntime_module
from device_agent.training_backends.state import OptimizerState, TrainingState


def _capi() -> Any:
    onnxruntime_module()
    if not has_training_api():
        raise BackendUnavailableError("the ort-training backend needs onnxruntime-training (install fedge[device-ort-training])")
    from onnxruntime.capi import _pybind_state

    return _pybind_state


class _SetSession:
    """One artifact set: checkpoint state, training module and optimizer."""

    def __init__(self, capi: Any, bundle: TrainingBundle, aset: ArtifactSet, checkpoint: Path, threads: int | None) -> None:
        from onnxruntime.capi.onnxruntime_inference_collection import OrtValue

        self._capi = capi
        self._ortvalue = OrtValue
        options = capi.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        device = capi.OrtDevice(capi.OrtDevice.cpu(), capi.OrtDevice.default_memory(), 0)
        self.state = capi.load_checkpoint(os.fspath(checkpoint))
        self.module = capi.Module(os.fspath(bundle.path(aset.training_model)), self.state,
                                  os.fspath(bundle.path(aset.eval_model)), device, options)
        self.optimizer = capi.Optimizer(os.fspath(bundle.path(aset.optimizer_model)), self.state, device, options)

    def _values(self, arrays: Sequence[np.ndarray]) -> tuple[Any, list[Any]]:
        # Wrapping numpy buffers as OrtValues ourselves is ~20% faster per step for small
        # models than handing numpy arrays to the pybind layer (measured, bench/train.py).
        vec = self._capi.OrtValueVector()
        vec.reserve(len(arrays))
        keep = []
        for a in arrays:
            value = self._ortvalue.ortvalue_from_numpy(np.ascontiguousarray(a))
            keep.append(value)  # OrtValues alias the numpy buffers: keep them alive for the call
            vec.push_back(value._ortvalue)
        return vec, keep

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        fetches = self._capi.OrtValueVector()
        values, _keep = self._values([x, y])
        self.module.train_step_with_ort_values(values, fetches)
        self.optimizer.optimizer_step()
        self.module.lazy_reset_grad()
        return float(fetches[0].numpy())

    def eval_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        fetches = self._capi.OrtValueVector()
        values, _keep = self._values([x, y])
        self.module.eval_step_with_ort_values(values, fetches)
        return float(fetches[0].numpy()), fetches[1].numpy()

    def get(self, name: str) -> np.ndarray:
        return np.array(self.state.get_parameter(name).data.numpy(), copy=True)

    def set(self, name: str, value: np.ndarray) -> None:
        self.state.copy_parameter_from(name, self._ortvalue.ortvalue_from_numpy(np.ascontiguousarray(value))._ortvalue)

    def save(self, path: Path) -> None:
        self._capi.save_checkpoint(self.state, os.fspath(path), True)


class OrtTrainingBackend(TrainingBackend):
    """Trains a bundle's ORT-training artifact sets; ``state`` None starts from the bundle's checkpoints."""

    name = BackendName.ORT_TRAINING

    def __init__(self, bundle: TrainingBundle, *, threads: int | None = None, state: TrainingState | None = None) -> None:
        manifest = bundle.manifest
        if not manifest.artifact_sets:
            raise BackendUnavailableError("this bundle carries no ORT-training artifacts (built for the portable backend only)")
        capi = _capi()
        self._manifest = manifest
        self._sessions: dict[ArtifactSetName, _SetSession] = {}
        with tempfile.TemporaryDirectory(prefix="fedge-ort-state-") as tmp:
            for aset in manifest.artifact_sets:
                checkpoint = bundle.path(aset.checkpoint)
                if state is not None:
                    checkpoint = Path(tmp) / aset.name.value
                    checkpoint.write_bytes(write_checkpoint(self._checkpoint_for(aset, state)))
                self._sessions[aset.name] = _SetSession(capi, bundle, aset, checkpoint, threads)
        self._fresh: ArtifactSetName | None = None  # the set whose state holds the newest trained values
        # ORT starts from its optimizer graph's default rate, not the checkpoint's: set the bundle's.
        self.set_learning_rate(manifest.hyperparameters.learning_rate)

    def _checkpoint_for(self, aset: ArtifactSet, state: TrainingState) -> OrtCheckpoint:
        trainable = {n: state.parameters[n] for n in aset.trainable}
        frozen = {n: v for n, v in state.parameters.items() if n not in trainable}
        frozen.update({ANCHOR_PREFIX + n: v for n, v in state.anchors.items()})
        opt = state.optimizers[aset.name]
        adam = self._manifest.hyperparameters.optimizer is OptimizerKind.ADAMW
        # ORT keeps one zero "momentum0" per parameter for SGD too; it expects it back.
        moments: dict[str, tuple[np.ndarray, ...]] = {
            n: (opt.m[n], opt.v[n]) if adam else (np.zeros_like(v),) for n, v in trainable.items()}
        return OrtCheckpoint(trainable=trainable, frozen=frozen, step=opt.step,
                             learning_rate=self._manifest.hyperparameters.learning_rate, moments=moments)

    def _current(self) -> _SetSession:
        return self._sessions[self._fresh] if self._fresh is not None else next(iter(self._sessions.values()))

    def _sync(self) -> None:
        if self._fresh is None:
            return
        src = self._sessions[self._fresh]
        for name in self._manifest.trainable(self._fresh):
            value = src.get(name)
            for set_name, session in self._sessions.items():
                if set_name is not self._fresh:
                    session.set(name, value)
        self._fresh = None

    def train_step(self, set_name: ArtifactSetName, x: np.ndarray, y: np.ndarray) -> float:
        if self._fresh is not set_name:
            self._sync()
        loss = self._sessions[set_name].train_step(x, y)
        self._fresh = set_name
        return loss

    def eval_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        return self._current().eval_step(x, y)

    def get_parameter(self, name: str) -> np.ndarray:
        return self._current().get(name)

    def set_parameter(self, name: str, value: np.ndarray) -> None:
        for session in self._sessions.values():
            session.set(name, value)

    def set_learning_rate(self, value: float) -> None:
        for session in self._sessions.values():
            session.optimizer.set_learning_rate(float(value))

    def export_state(self) -> TrainingState:
        self._sync()
        manifest = self._manifest
        params = {p.name: self.get_parameter(p.name) for p in manifest.parameters}
        anchors = {n: self.get_parameter(ANCHOR_PREFIX + n) for n in manifest.shared_names} if manifest.has_anchors else {}
        adam = manifest.hyperparameters.optimizer is OptimizerKind.ADAMW
        optimizers = {}
        with tempfile.TemporaryDirectory(prefix="fedge-ort-state-") as tmp:
            for set_name, session in self._sessions.items():
                path = Path(tmp) / set_name.value
                session.save(path)
                ckpt = read_checkpoint(path.read_bytes())
                # A set that never stepped may have no moments saved yet: they are zeros.
                moments = ckpt.moments or {}
                zeros = {n: np.zeros_like(params[n]) for n in manifest.trainable(set_name)} if adam else {}
                optimizers[set_name] = OptimizerState(
                    step=ckpt.step or 0,
                    m={n: moments[n][0] if n in moments else z for n, z in zeros.items()},
                    v={n: moments[n][1] if n in moments else z.copy() for n, z in zeros.items()},
                )
        return TrainingState(parameters=params, anchors=anchors, optimizers=optimizers)
