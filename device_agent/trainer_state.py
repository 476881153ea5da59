"""Reading a saved trainer generation back: the neutral training state and the global reference."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from device_agent.bundle.manifest import BundleManifest
from device_agent.errors import StateError
from device_agent.npy_header import NpyFormatError, load_npz_arrays
from device_agent.state_store import StoredState
from device_agent.training_backends import TrainingState
from device_agent.training_backends.legacy_state import is_legacy_generation, state_from_ort_checkpoints
from device_agent.training_backends.state import state_from_arrays

logger = logging.getLogger(__name__)

#: What ``save_state`` writes: 2 = ``state.npz`` (backend-neutral named arrays); 1 = one ORT checkpoint per set.
STATE_FORMAT = 2


def read_training_state(stored: StoredState, manifest: BundleManifest) -> TrainingState:
    """The neutral training state of a stored generation; format 1 (ORT checkpoints) is migrated on the fly."""
    if is_legacy_generation(stored.directory):
        logger.info("migrating state generation %d from ORT checkpoints (state format 1)", stored.generation)
        return state_from_ort_checkpoints(stored.directory, manifest)
    path = stored.directory / "state.npz"
    try:
        arrays = load_npz_arrays(path)
    except (OSError, ValueError) as exc:
        raise StateError(f"{path}: cannot read: {exc}") from exc
    return state_from_arrays(arrays, manifest)


def read_parameter_file(path: Path, spec: Mapping[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray]:
    """Arrays of ``path`` (an ``.npz``), checked to be exactly ``spec``'s names and shapes; StateError otherwise."""
    try:
        arrays = load_npz_arrays(path)
    except NpyFormatError as exc:
        raise StateError(f"{path}: cannot read: {exc}") from exc
    if set(arrays) != set(spec):
        raise StateError(f"{path}: arrays {sorted(arrays)} do not match the bundle's shared parameters")
    out = {n: np.asarray(a, dtype=np.float32) for n, a in arrays.items()}
    for n, arr in out.items():
        if arr.shape != spec[n][0]:
            raise StateError(f"{path}: {n} has shape {arr.shape}, expected {spec[n][0]}")
    return out


def read_serving_weight(meta: Mapping[str, object]) -> float:
    """The saved mixture weight of the personal model (1.0 when absent); StateError when it is not in [0, 1]."""
    value = meta.get("serving_weight", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise StateError(f"saved serving_weight {value!r} is not a number in [0, 1]")
    return float(value)
