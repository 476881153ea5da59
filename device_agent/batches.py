"""Checking one mini-batch against the bundle's input and label spec before it reaches ONNX Runtime."""

from __future__ import annotations

import math

import numpy as np

from device_agent.bundle.manifest import BundleManifest, LossKind
from device_agent.data import Batch
from device_agent.errors import TrainingError


def prepare_batch(manifest: BundleManifest, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) as the graphs take them: float32 inputs of the bundle's shape, int64 class indices or float32 targets.

    TrainingError names the problem: a wrong input or target shape, NaN/Inf inputs, labels out of range.
    """
    spec = manifest.inputs[0]
    x = np.ascontiguousarray(batch.x, dtype=np.float32)
    if x.shape[1:] != tuple(spec.shape[1:]):
        raise TrainingError(f"input shape {x.shape[1:]} does not match the bundle's {tuple(spec.shape[1:])}")
    if not np.isfinite(x).all():
        raise TrainingError("input batch contains NaN or Inf")
    if manifest.hyperparameters.loss is LossKind.CROSS_ENTROPY:
        y = np.asarray(batch.y)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
            raise TrainingError("cross-entropy labels must be a 1-D array of class indices")
        y = y.astype(np.int64)
        classes = manifest.hyperparameters.num_classes
        if y.size and (y.min() < 0 or (classes is not None and y.max() >= classes)):
            raise TrainingError(f"labels must lie in [0, {classes})")
    else:
        y = np.ascontiguousarray(batch.y, dtype=np.float32)
        want = tuple(manifest.label.shape[1:])
        if y.shape[1:] != want:
            y = y.reshape((y.shape[0], *want)) if y.size == y.shape[0] * math.prod(d or 1 for d in want) else y
        if y.shape[1:] != want:
            raise TrainingError(f"target shape {y.shape[1:]} does not match the bundle's {want}")
    return x, y
