"""Backend-neutral training state: named numpy arrays any backend can export and import.

A device that changes backend (a Pi moving from an x86 gateway image, an
upgrade from onnxruntime-training to plain onnxruntime) keeps its personal
head, its FedProx anchors and its optimizer moments. Array names:

- ``param/<name>``: every model parameter (shared and personal);
- ``anchor/<name>``: FedProx anchors of the shared parameters (bundles with mu > 0, and Ditto's);
- ``ditto/<name>``: Ditto's personal model, a second value of every parameter (Ditto bundles only);
- ``opt/<set>/step``: optimizer steps taken by artifact set ``<set>`` (int64 scalar);
- ``opt/<set>/m/<name>``, ``opt/<set>/v/<name>``: AdamW moments of that set's trainable parameters.

Each artifact set keeps its own optimizer state, as ORT-training does (FedAlt's
two phases never share moments). Backends hold one value per parameter; the
trainer keeps Ditto's second value and adds it to the state it saves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from device_agent.bundle.manifest import ArtifactSetName, BundleManifest, OptimizerKind, TrainingMode
from device_agent.errors import StateError


@dataclass(frozen=True, kw_only=True)
class OptimizerState:
    """One artifact set's optimizer: steps taken and, for AdamW, the moments ``m`` and ``v`` by parameter (empty for SGD)."""

    step: int
    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class TrainingState:
    """Everything a backend needs to continue training exactly where another one stopped.

    ``personal_model``: Ditto's personal value of every parameter (empty for other modes).
    """

    parameters: dict[str, np.ndarray]
    anchors: dict[str, np.ndarray]
    optimizers: dict[ArtifactSetName, OptimizerState]
    personal_model: dict[str, np.ndarray] = field(default_factory=dict)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as one flat name -> array mapping (what ``state.npz`` holds)."""
        out: dict[str, np.ndarray] = {f"param/{n}": v for n, v in self.parameters.items()}
        out.update({f"anchor/{n}": v for n, v in self.anchors.items()})
        out.update({f"ditto/{n}": v for n, v in self.personal_model.items()})
        for set_name, opt in self.optimizers.items():
            out[f"opt/{set_name.value}/step"] = np.array(opt.step, dtype=np.int64)
            out.update({f"opt/{set_name.value}/m/{n}": v for n, v in opt.m.items()})
            out.update({f"opt/{set_name.value}/v/{n}": v for n, v in opt.v.items()})
        return out


def fresh_optimizer(manifest: BundleManifest, set_name: ArtifactSetName) -> OptimizerState:
    """The optimizer state of a set that has not trained yet: step 0, zero moments."""
    if manifest.hyperparameters.optimizer is not OptimizerKind.ADAMW:
        return OptimizerState(step=0, m={}, v={})
    shapes = {p.name: p.shape for p in manifest.parameters}
    zeros = {n: np.zeros(shapes[n], dtype=np.float32) for n in manifest.trainable(set_name)}
    return OptimizerState(step=0, m=zeros, v={n: z.copy() for n, z in zeros.items()})


def state_from_arrays(arrays: Mapping[str, np.ndarray], manifest: BundleManifest) -> TrainingState:
    """Parse and check arrays against the bundle: every name expected and no other, right shapes, finite values.

    Raises StateError naming the first problem.
    """
    shapes = {p.name: p.shape for p in manifest.parameters}
    expected: dict[str, tuple[int, ...]] = {f"param/{n}": s for n, s in shapes.items()}
    if manifest.has_anchors:
        expected.update({f"anchor/{n}": shapes[n] for n in manifest.shared_names})
    ditto = manifest.hyperparameters.mode is TrainingMode.DITTO
    if ditto:
        expected.update({f"ditto/{n}": s for n, s in shapes.items()})
    adam = manifest.hyperparameters.optimizer is OptimizerKind.ADAMW
    for set_name in manifest.set_names:
        expected[f"opt/{set_name.value}/step"] = ()
        if adam:
            for n in manifest.trainable(set_name):
                expected[f"opt/{set_name.value}/m/{n}"] = shapes[n]
                expected[f"opt/{set_name.value}/v/{n}"] = shapes[n]
    missing, unknown = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or unknown:
        raise StateError(f"training state does not fit the bundle: missing {missing[:5]}, unknown {unknown[:5]}")
    checked: dict[str, np.ndarray] = {}
    for key, shape in expected.items():
        arr = np.asarray(arrays[key])
        if arr.shape != shape:
            raise StateError(f"training state: {key} has shape {arr.shape}, expected {shape}")
        if key.endswith("/step"):
            if not np.issubdtype(arr.dtype, np.integer) or int(arr) < 0:
                raise StateError(f"training state: {key} must be a non-negative integer")
            checked[key] = arr.astype(np.int64)
            continue
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise StateError(f"training state: {key} holds NaN or infinite values")
        checked[key] = arr
    optimizers = {}
    for set_name in manifest.set_names:
        prefix = f"opt/{set_name.value}/"
        trainable = manifest.trainable(set_name) if adam else ()
        optimizers[set_name] = OptimizerState(
            step=int(checked[prefix + "step"]),
            m={n: checked[f"{prefix}m/{n}"] for n in trainable},
            v={n: checked[f"{prefix}v/{n}"] for n in trainable},
        )
    return TrainingState(
        parameters={n: checked[f"param/{n}"] for n in shapes},
        anchors={n: checked[f"anchor/{n}"] for n in manifest.shared_names if f"anchor/{n}" in checked},
        optimizers=optimizers,
        personal_model={n: checked[f"ditto/{n}"] for n in shapes} if ditto else {},
    )
