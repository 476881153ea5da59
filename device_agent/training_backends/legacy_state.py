"""Migrating state generations written before backends existed (state format 1).

Format 1 kept one ORT checkpoint per artifact set (``ckpt-<set>``, with the
optimizer moments) next to ``global.npz``. Such a generation is read once into
a backend-neutral :class:`TrainingState`; the next save writes format 2, so
any backend can resume an existing device without losing its personal head or
its moments.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device_agent.bundle.manifest import ANCHOR_PREFIX, BundleManifest, OptimizerKind
from device_agent.errors import StateError
from device_agent.training_backends.ort_checkpoint import read_checkpoint
from device_agent.training_backends.state import OptimizerState, TrainingState, fresh_optimizer, state_from_arrays


def is_legacy_generation(directory: Path) -> bool:
    """True for a format-1 generation (ORT checkpoints, no ``state.npz``)."""
    return not (directory / "state.npz").exists() and any(directory.glob("ckpt-*"))


def state_from_ort_checkpoints(directory: Path, manifest: BundleManifest) -> TrainingState:
    """The neutral state held by a format-1 generation's ``ckpt-<set>`` files (StateError if any is missing or damaged)."""
    params: dict[str, np.ndarray] = {}
    anchors: dict[str, np.ndarray] = {}
    optimizers = {}
    adam = manifest.hyperparameters.optimizer is OptimizerKind.ADAMW
    for set_name in manifest.set_names:
        path = directory / f"ckpt-{set_name.value}"
        try:
            ckpt = read_checkpoint(path.read_bytes())
        except OSError as exc:
            raise StateError(f"{path}: cannot read: {exc}") from exc
        for name, value in {**ckpt.frozen, **ckpt.trainable}.items():
            if name.startswith(ANCHOR_PREFIX):
                anchors.setdefault(name[len(ANCHOR_PREFIX):], value)
            else:
                params.setdefault(name, value)
        params.update(ckpt.trainable)  # a set's own trainables are authoritative
        if ckpt.step is None:
            optimizers[set_name] = fresh_optimizer(manifest, set_name)
            continue
        moments = ckpt.moments or {}
        trainable = manifest.trainable(set_name) if adam else ()
        missing = [n for n in trainable if len(moments.get(n, ())) < 2]
        if missing:
            raise StateError(f"{path}: AdamW moments missing for {missing}")
        optimizers[set_name] = OptimizerState(step=ckpt.step, m={n: moments[n][0] for n in trainable},
                                              v={n: moments[n][1] for n in trainable})
    arrays = TrainingState(parameters=params, anchors=anchors, optimizers=optimizers).to_arrays()
    return state_from_arrays(arrays, manifest)  # the same checks as a format-2 state
