"""The on-device trainer: a verified bundle, local data, ONNX Runtime, no torch.

Modes (see :class:`~device_agent.bundle.manifest.TrainingMode`): ``fedavg``,
``fedprox`` and ``fedsim`` train one artifact set; ``fedalt`` alternates a
personal-head phase (shared layers frozen) and a shared phase (head frozen),
each with its own optimizer state (Pillutla et al., ICML 2022, Algorithm 1
"FedAlt"). The graphs run on a training backend (``device_agent.training_backends``):
``ort-training`` or ``portable``, chosen from what is installed and what the
bundle carries; saved state is backend-neutral named arrays.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_agent.bundle.archive import TrainingBundle
from device_agent.bundle.manifest import ANCHOR_PREFIX, ArtifactSetName, BundleManifest, LossKind, TrainingMode
from device_agent.data import ArrayDataSource, Batch, DataSource
from device_agent.errors import StateError, TrainingError
from device_agent.state_store import StateStore, StoredState
from device_agent.training_backends import BackendName, TrainingState, choose_backend, open_backend
from device_agent.training_backends.legacy_state import is_legacy_generation, state_from_ort_checkpoints
from device_agent.training_backends.state import state_from_arrays

logger = logging.getLogger(__name__)

ParameterDict = dict[str, np.ndarray]

#: What ``save_state`` writes: 2 = ``state.npz`` (backend-neutral named arrays); 1 = one ORT checkpoint per set.
STATE_FORMAT = 2


@dataclass(frozen=True, kw_only=True)
class TrainBudget:
    """How much local work one round may do.

    ``epochs`` passes over the data per phase, capped at ``max_steps`` steps per
    phase when given (a straggler's partial budget). For ``fedalt``,
    ``personal_epochs`` sets the head phase (None: same as ``epochs``).
    ``learning_rate`` None keeps the bundle's default.
    """

    epochs: int = 1
    batch_size: int = 32
    max_steps: int | None = None
    personal_epochs: int | None = None
    learning_rate: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError("max_steps must be >= 0")
        if self.personal_epochs is not None and self.personal_epochs < 0:
            raise ValueError("personal_epochs must be >= 0")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError("learning_rate must be > 0")


@dataclass(frozen=True, kw_only=True)
class TrainReport:
    """What one call to :meth:`DeviceTrainer.train` did."""

    steps: int
    examples: int
    mean_loss: float
    seconds: float
    phase_steps: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class EvalReport:
    """Loss (mean over examples) and, for classification, accuracy; ``accuracy`` None otherwise."""

    loss: float
    accuracy: float | None
    examples: int


class DeviceTrainer:
    """Trains a verified bundle on local data and exposes the shared layers as numpy arrays.

    ``state_dir`` None keeps everything in memory; otherwise :meth:`save_state`
    persists personal weights, optimizer state and the last global model there,
    and a new trainer on the same directory resumes from the last complete save,
    whichever backend wrote it. ``backend``: ``auto`` (see
    :func:`~device_agent.training_backends.choose_backend`), ``portable`` or
    ``ort-training``; :attr:`backend_name` says which one runs.
    """

    def __init__(
        self,
        bundle: TrainingBundle,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        backend: BackendName | str = BackendName.AUTO,
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self._hyper = self.manifest.hyperparameters
        self.backend_name = choose_backend(backend, self.manifest)
        self._store = StateStore(state_dir) if state_dir is not None else None
        self.round = -1
        self.total_steps = 0
        stored = self._store.load() if self._store is not None else None
        if stored is not None and stored.meta.get("manifest_sha256") != bundle.manifest_sha256:
            logger.warning("saved state belongs to another bundle; starting from this bundle's weights")
            stored = None
        state = _read_state(stored, self.manifest) if stored is not None else None
        self._backend = open_backend(self.backend_name, bundle, threads=threads, state=state)
        self._has_anchors = self._hyper.mu > 0
        if stored is not None:
            self.round = int(stored.meta["round"])
            self.total_steps = int(stored.meta["total_steps"])
            self._global = _load_arrays(stored.directory / "global.npz", self.manifest.shared_spec())
            logger.info("resumed device state generation %d (round %d, written by %s) on backend %s", stored.generation,
                        self.round, stored.meta.get("backend", "ort-training"), self.backend_name.value)
        else:
            self._global = self.get_shared()

    # -- parameters -------------------------------------------------------------------------

    def _get(self, names: tuple[str, ...]) -> ParameterDict:
        return {n: self._backend.get_parameter(n) for n in names}

    def _set_everywhere(self, name: str, value: np.ndarray) -> None:
        self._backend.set_parameter(name, value)

    def _checked(self, params: Mapping[str, np.ndarray], *, complete: bool = True) -> ParameterDict:
        spec = self.manifest.shared_spec()
        unknown = sorted(set(params) - set(spec))
        missing = sorted(set(spec) - set(params)) if complete else []
        if unknown or missing:
            raise ValueError(f"shared parameters: unknown {unknown}, missing {missing}")
        out = {}
        for name, value in params.items():
            arr = np.asarray(value, dtype=np.float32)
            if arr.shape != spec[name][0]:
                raise ValueError(f"{name}: shape {arr.shape}, bundle expects {spec[name][0]}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name}: non-finite values")
            out[name] = np.ascontiguousarray(arr)
        return out

    def get_shared(self) -> ParameterDict:
        """Current shared-layer weights (copies), by parameter name."""
        return self._get(self.manifest.shared_names)

    def get_personal(self) -> ParameterDict:
        """Current personal-head weights (copies); empty for fedavg/fedprox bundles."""
        return self._get(self.manifest.personal_names)

    def set_personal(self, params: Mapping[str, np.ndarray]) -> None:
        """Overwrite some or all personal-head weights (e.g. carried over from another bundle version).

        ValueError for a name that is not a personal parameter, another shape, or non-finite values.
        """
        personal = set(self.manifest.personal_names)
        for name, value in params.items():
            arr = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
            if name not in personal:
                raise ValueError(f"{name} is not a personal parameter of this bundle")
            if arr.shape != tuple(self.manifest.parameter(name).shape):
                raise ValueError(f"{name}: shape {arr.shape}, bundle expects {tuple(self.manifest.parameter(name).shape)}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name}: non-finite values")
            self._set_everywhere(name, arr)

    def set_shared(self, params: Mapping[str, np.ndarray]) -> None:
        """Overwrite some or all shared weights without touching the anchors or the global reference."""
        for name, value in self._checked(params, complete=False).items():
            self._set_everywhere(name, value)

    def set_anchors(self, params: Mapping[str, np.ndarray]) -> None:
        """Write the FedProx anchors (no-op when the bundle has mu == 0)."""
        if not self._has_anchors:
            return
        for name, value in self._checked(params).items():
            self._set_everywhere(ANCHOR_PREFIX + name, value)

    def get_anchors(self) -> ParameterDict:
        """Current FedProx anchors by shared parameter name; empty when mu == 0."""
        if not self._has_anchors:
            return {}
        return {n: self._backend.get_parameter(ANCHOR_PREFIX + n) for n in self.manifest.shared_names}

    def set_global(self, params: Mapping[str, np.ndarray], *, round_number: int | None = None) -> None:
        """Adopt a received global model: shared weights, FedProx anchors and the delta reference."""
        checked = self._checked(params)
        for name, value in checked.items():
            self._set_everywhere(name, value)
        self.set_anchors(checked)
        self._global = {n: v.copy() for n, v in checked.items()}
        if round_number is not None:
            self.round = int(round_number)

    @property
    def global_reference(self) -> ParameterDict:
        """The last global shared weights received (the bundle's initial weights before any)."""
        return {n: v.copy() for n, v in self._global.items()}

    def shared_delta(self) -> ParameterDict:
        """shared_now - last received global: what the device sends to its aggregator."""
        now = self.get_shared()
        return {n: (now[n] - self._global[n]).astype(np.float32) for n in now}

    # -- data -------------------------------------------------------------------------------

    def _prepare(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        spec = self.manifest.inputs[0]
        x = np.ascontiguousarray(batch.x, dtype=np.float32)
        if x.shape[1:] != tuple(spec.shape[1:]):
            raise TrainingError(f"input shape {x.shape[1:]} does not match the bundle's {tuple(spec.shape[1:])}")
        if not np.isfinite(x).all():
            raise TrainingError("input batch contains NaN or Inf")
        if self._hyper.loss is LossKind.CROSS_ENTROPY:
            y = np.asarray(batch.y)
            if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
                raise TrainingError("cross-entropy labels must be a 1-D array of class indices")
            y = y.astype(np.int64)
            classes = self._hyper.num_classes
            if y.size and (y.min() < 0 or (classes is not None and y.max() >= classes)):
                raise TrainingError(f"labels must lie in [0, {classes})")
        else:
            y = np.ascontiguousarray(batch.y, dtype=np.float32)
            want = tuple(self.manifest.label.shape[1:])
            if y.shape[1:] != want:
                y = y.reshape((y.shape[0], *want)) if y.size == y.shape[0] * math.prod(d or 1 for d in want) else y
            if y.shape[1:] != want:
                raise TrainingError(f"target shape {y.shape[1:]} does not match the bundle's {want}")
        return x, y

    # -- training ---------------------------------------------------------------------------

    def _phases(self, budget: TrainBudget) -> list[tuple[ArtifactSetName, int]]:
        if self._hyper.mode is TrainingMode.FEDALT:
            head = budget.epochs if budget.personal_epochs is None else budget.personal_epochs
            return [(ArtifactSetName.PERSONAL, head), (ArtifactSetName.SHARED, budget.epochs)]
        return [(ArtifactSetName.JOINT, budget.epochs)]

    def train(
        self,
        data: DataSource,
        budget: TrainBudget = TrainBudget(),
        *,
        rng: np.random.Generator | None = None,
    ) -> TrainReport:
        """Train within ``budget`` on ``data`` (shuffled with ``rng``; in order when None)."""
        return self._run_phases(data, budget, self._phases(budget), rng)

    @property
    def can_fine_tune(self) -> bool:
        """True when the bundle ships a ``finetune`` artifact set."""
        return ArtifactSetName.FINETUNE in self.manifest.set_names

    @property
    def fine_tune_names(self) -> tuple[str, ...]:
        """The parameters :meth:`fine_tune` trains (empty without a ``finetune`` set)."""
        return self.manifest.trainable(ArtifactSetName.FINETUNE) if self.can_fine_tune else ()

    def fine_tune(
        self,
        data: DataSource,
        budget: TrainBudget = TrainBudget(),
        *,
        rng: np.random.Generator | None = None,
    ) -> TrainReport:
        """Train only the bundle's ``finetune`` parameters (e.g. the head of a FedAvg model) for ``budget.epochs``.

        The tuned weights replace the model's; :meth:`set_global` brings the
        received global weights back. Raises TrainingError when the bundle
        has no ``finetune`` set.
        """
        if not self.can_fine_tune:
            raise TrainingError("this bundle has no 'finetune' artifact set (build it with TrainingSpec(finetune=...))")
        return self._run_phases(data, budget, [(ArtifactSetName.FINETUNE, budget.epochs)], rng)

    def _run_phases(
        self,
        data: DataSource,
        budget: TrainBudget,
        phases: list[tuple[ArtifactSetName, int]],
        rng: np.random.Generator | None,
    ) -> TrainReport:
        if len(data) == 0:
            raise TrainingError("no local data to train on")
        lr = budget.learning_rate if budget.learning_rate is not None else self._hyper.learning_rate
        start = time.perf_counter()
        losses = 0.0
        examples = 0
        phase_steps: dict[str, int] = {}
        self._backend.set_learning_rate(lr)
        for set_name, epochs in phases:
            steps = 0
            for _ in range(epochs):
                for batch in data.batches(budget.batch_size, rng=rng):
                    if budget.max_steps is not None and steps >= budget.max_steps:
                        break
                    x, y = self._prepare(batch)
                    loss = self._backend.train_step(set_name, x, y)
                    if not math.isfinite(loss):
                        raise TrainingError(f"loss became non-finite at step {steps} of phase {set_name.value}")
                    losses += loss * x.shape[0]
                    examples += x.shape[0]
                    steps += 1
            phase_steps[set_name.value] = steps
        total = sum(phase_steps.values())
        self.total_steps += total
        return TrainReport(
            steps=total,
            examples=examples,
            mean_loss=losses / examples if examples else float("nan"),
            seconds=time.perf_counter() - start,
            phase_steps=phase_steps,
        )

    def evaluate(self, data: DataSource, *, batch_size: int = 256) -> EvalReport:
        """Mean loss (including the FedProx term when mu > 0) and accuracy for classification."""
        total_loss = 0.0
        correct = 0
        n = 0
        for batch in data.batches(batch_size):
            x, y = self._prepare(batch)
            loss, out = self._backend.eval_step(x, y)
            total_loss += loss * x.shape[0]
            n += x.shape[0]
            if self._hyper.loss is LossKind.CROSS_ENTROPY:
                correct += int(np.sum(np.argmax(out, axis=-1) == y))
            elif self._hyper.loss is LossKind.BCE_WITH_LOGITS:
                correct += int(np.sum((out > 0) == (y > 0.5))) // max(1, int(np.prod(y.shape[1:])))
        if n == 0:
            raise TrainingError("no data to evaluate")
        accuracy = correct / n if self._hyper.loss is not LossKind.MSE else None
        return EvalReport(loss=total_loss / n, accuracy=accuracy, examples=n)

    def predict(self, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """Model outputs (logits for classification) of the personalised model."""
        x = np.asarray(x, dtype=np.float32)
        if self._hyper.loss is LossKind.CROSS_ENTROPY:
            dummy = np.zeros((x.shape[0],), dtype=np.int64)
        else:
            dummy = np.zeros((x.shape[0], *self.manifest.label.shape[1:]), dtype=np.float32)
        # The eval graph ends in the loss and needs labels; dummy labels only change the
        # discarded loss value, never the outputs.
        outs = []
        for b in ArrayDataSource(x, dummy).batches(batch_size):
            xx, yy = self._prepare(b)
            outs.append(self._backend.eval_step(xx, yy)[1])
        return np.concatenate(outs) if outs else np.zeros((0,), dtype=np.float32)

    # -- persistence --------------------------------------------------------------------------

    def export_state(self) -> TrainingState:
        """Parameters, FedProx anchors and every set's optimizer state as backend-neutral named arrays (copies)."""
        return self._backend.export_state()

    def save_state(self) -> None:
        """Persist weights, optimizer state, the global reference and counters atomically (state format 2)."""
        if self._store is None:
            raise StateError("this trainer has no state_dir")
        arrays = self._backend.export_state().to_arrays()

        def write(d: Path) -> None:
            with open(d / "state.npz", "wb") as fh:
                np.savez(fh, **arrays)  # type: ignore[arg-type]
            with open(d / "global.npz", "wb") as fh:
                np.savez(fh, **self._global)  # type: ignore[arg-type]

        self._store.save(write, {"manifest_sha256": self.bundle.manifest_sha256, "round": self.round,
                                 "total_steps": self.total_steps, "state_format": STATE_FORMAT,
                                 "backend": self.backend_name.value})


def _read_state(stored: StoredState, manifest: BundleManifest) -> TrainingState:
    """The neutral training state of a stored generation; format 1 (ORT checkpoints) is migrated on the fly."""
    if is_legacy_generation(stored.directory):
        logger.info("migrating state generation %d from ORT checkpoints (state format 1)", stored.generation)
        return state_from_ort_checkpoints(stored.directory, manifest)
    path = stored.directory / "state.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {n: data[n] for n in data.files}
    except (OSError, ValueError) as exc:
        raise StateError(f"{path}: cannot read: {exc}") from exc
    return state_from_arrays(arrays, manifest)


def _load_arrays(path: Path, spec: Mapping[str, tuple[tuple[int, ...], str]]) -> ParameterDict:
    with np.load(path, allow_pickle=False) as data:
        if set(data.files) != set(spec):
            raise StateError(f"{path}: arrays {sorted(data.files)} do not match the bundle's shared parameters")
        out = {n: np.asarray(data[n], dtype=np.float32) for n in data.files}
    for n, arr in out.items():
        if arr.shape != spec[n][0]:
            raise StateError(f"{path}: {n} has shape {arr.shape}, expected {spec[n][0]}")
    return out
