"""The on-device trainer: a verified bundle, local data, ONNX Runtime, no torch.

Modes (see :class:`~device_agent.bundle.manifest.TrainingMode`): ``fedavg``,
``fedprox`` and ``fedsim`` train one artifact set; ``fedalt`` alternates a
personal-head phase (shared layers frozen) and a shared phase (head frozen),
each with its own optimizer state (Pillutla et al., ICML 2022, Algorithm 1
"FedAlt"). ``ditto`` (Li et al., ICML 2021, Algorithm 1) keeps two values of
every parameter: the global model's, which trains as in fedavg/fedprox and
whose delta is sent, and the device's personal model, which then trains with
``lambda/2 ||v - w_global||^2`` towards the received global model (the
anchors); the backend holds the global track, the trainer the personal one,
and both are saved. The graphs run on a training backend
(``device_agent.training_backends``): ``ort-training`` or ``portable``, chosen
from what is installed and what the bundle carries; saved state is
backend-neutral named arrays.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from device_agent.bundle.archive import TrainingBundle
from device_agent.bundle.manifest import ANCHOR_PREFIX, ArtifactSetName, LossKind, TrainingMode
from device_agent.batches import prepare_batch
from device_agent.data import ArrayDataSource, Batch, DataSource
from device_agent.errors import StateError, TrainingError
from device_agent.personalization.model_choice import correct_count, mix_outputs, output_loss
from device_agent.state_store import StateStore
from device_agent.trainer_state import STATE_FORMAT, read_parameter_file, read_serving_weight, read_training_state
from device_agent.training_backends import BackendName, TrainingState, choose_backend, open_backend
from device_agent.training_backends.state import OptimizerState, fresh_optimizer
from device_agent.training_types import EvalReport, ModelView, TrainBudget, TrainReport

__all__ = ["STATE_FORMAT", "DeviceTrainer", "EvalReport", "ModelView", "TrainBudget", "TrainReport"]

logger = logging.getLogger(__name__)

ParameterDict = dict[str, np.ndarray]


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
        self._ditto = self._hyper.mode is TrainingMode.DITTO
        self._names = tuple(p.name for p in self.manifest.parameters)
        self.backend_name = choose_backend(backend, self.manifest)
        self._store = StateStore(state_dir) if state_dir is not None else None
        self.round = -1
        self.total_steps = 0
        self._serving_weight = 1.0
        stored = self._store.load() if self._store is not None else None
        if stored is not None and stored.meta.get("manifest_sha256") != bundle.manifest_sha256:
            logger.warning("saved state belongs to another bundle; starting from this bundle's weights")
            stored = None
        state = read_training_state(stored, self.manifest) if stored is not None else None
        self._threads = threads
        self._backend = open_backend(self.backend_name, bundle, threads=threads, state=state)
        self._has_anchors = self.manifest.has_anchors
        if stored is not None:
            self.round = int(stored.meta["round"])
            self.total_steps = int(stored.meta["total_steps"])
            self._serving_weight = read_serving_weight(stored.meta)
            self._global = read_parameter_file(stored.directory / "global.npz", self.manifest.shared_spec())
            logger.info("resumed device state generation %d (round %d, written by %s) on backend %s", stored.generation,
                        self.round, stored.meta.get("backend", "ort-training"), self.backend_name.value)
        else:
            self._global = self.get_shared()
        # Ditto's personal model starts where the global one does: the bundle's initial weights.
        self._personal_model: ParameterDict = (
            {} if not self._ditto else dict(state.personal_model) if state is not None else self._get(self._names))

    # -- parameters -------------------------------------------------------------------------

    def _get(self, names: tuple[str, ...]) -> ParameterDict:
        return {n: self._backend.get_parameter(n) for n in names}

    def _set_everywhere(self, name: str, value: np.ndarray) -> None:
        self._backend.set_parameter(name, value)

    def _load(self, params: Mapping[str, np.ndarray]) -> None:
        for name, value in params.items():
            self._backend.set_parameter(name, value)

    @contextlib.contextmanager
    def _holding(self, params: Mapping[str, np.ndarray] | None) -> Iterator[None]:
        """Run the block with ``params`` loaded in place of the current values (None: as they are), then put those back."""
        if params is None:
            yield
            return
        previous = self._get(tuple(params))
        self._load(params)
        try:
            yield
        finally:
            self._load(previous)

    def _checked(self, params: Mapping[str, np.ndarray], *, complete: bool = True,
                 spec: Mapping[str, tuple[tuple[int, ...], str]] | None = None) -> ParameterDict:
        spec = self.manifest.shared_spec() if spec is None else spec
        unknown = sorted(set(params) - set(spec))
        missing = sorted(set(spec) - set(params)) if complete else []
        if unknown or missing:
            raise ValueError(f"parameters: unknown {unknown}, missing {missing}")
        out = {}
        for name, value in params.items():
            arr = np.asarray(value, dtype=np.float32)
            if arr.shape != spec[name][0]:
                raise ValueError(f"{name}: shape {arr.shape}, bundle expects {spec[name][0]}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name}: non-finite values")
            out[name] = np.ascontiguousarray(arr)
        return out

    @contextlib.contextmanager
    def fresh_optimizers(self) -> Iterator[None]:
        """Inside the block every artifact set trains from step 0 with zero moments; afterwards each set's previous optimizer state is back.

        For fine-tuning after federation: the moments the federated rounds (or an earlier
        fine-tuning from another starting point) left behind would scale the first steps
        from the received model; afterwards the device's own training goes on with its own
        moments. Weights, anchors and Ditto's personal model are untouched either way. Costs
        two backend re-opens.
        """
        kept = self._backend.export_state().optimizers
        self._reopen({s: fresh_optimizer(self.manifest, s) for s in kept})
        try:
            yield
        finally:
            self._reopen(kept)

    def _reopen(self, optimizers: Mapping[ArtifactSetName, OptimizerState]) -> None:
        """The backend re-opened on its current weights and anchors with ``optimizers`` as every set's optimizer state."""
        state = self._backend.export_state()
        self._backend = open_backend(self.backend_name, self.bundle, threads=self._threads,
                                     state=replace(state, optimizers=dict(optimizers)))

    def get_shared(self) -> ParameterDict:
        """Current shared-layer weights (copies), by parameter name."""
        return self._get(self.manifest.shared_names)

    def get_personal(self) -> ParameterDict:
        """Current personal-head weights (copies); empty for fedavg/fedprox/ditto bundles."""
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
        """Write the FedProx (and Ditto) anchors (no-op when the bundle has none)."""
        if not self._has_anchors:
            return
        for name, value in self._checked(params).items():
            self._set_everywhere(ANCHOR_PREFIX + name, value)

    def get_anchors(self) -> ParameterDict:
        """Current anchors by shared parameter name; empty when the bundle has none (mu == 0 and not Ditto)."""
        if not self._has_anchors:
            return {}
        return {n: self._backend.get_parameter(ANCHOR_PREFIX + n) for n in self.manifest.shared_names}

    def set_global(self, params: Mapping[str, np.ndarray], *, round_number: int | None = None) -> None:
        """Adopt a received global model: shared weights, anchors and the delta reference (Ditto's personal model stays)."""
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

    # -- Ditto's personal model and the served mixture ----------------------------------------

    @property
    def has_personal_model(self) -> bool:
        """True for Ditto bundles: the device keeps a personal copy of every parameter."""
        return self._ditto

    def get_personal_model(self) -> ParameterDict:
        """Ditto's personal model (copies, every parameter); empty for other modes."""
        return {n: v.copy() for n, v in self._personal_model.items()}

    def set_personal_model(self, params: Mapping[str, np.ndarray]) -> None:
        """Overwrite Ditto's personal model (every parameter); ValueError for other modes or a wrong table."""
        if not self._ditto:
            raise ValueError(f"mode {self._hyper.mode.value} has no personal model")
        self._personal_model = self._checked(params, spec={p.name: (p.shape, p.dtype) for p in self.manifest.parameters})

    @property
    def serving_weight(self) -> float:
        """Ditto: the weight of the personal model's outputs in the model the device uses (1: personal only)."""
        return self._serving_weight

    def set_serving_weight(self, alpha: float) -> None:
        """Serve ``alpha * personal + (1 - alpha) * global`` outputs from now on (Ditto only; saved with the state)."""
        if not self._ditto:
            raise ValueError(f"mode {self._hyper.mode.value} has no personal model to mix")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self._serving_weight = float(alpha)

    def _view_parameters(self, view: ModelView) -> ParameterDict | None:
        """The values ``view`` evaluates with (None: the current ones); for a mixed Ditto view, not defined."""
        if view is ModelView.PERSONAL:
            if not self._ditto:
                raise ValueError(f"mode {self._hyper.mode.value} has no personal model; use served or global")
            return self._personal_model
        if view is ModelView.GLOBAL or (self._ditto and self._serving_weight == 0.0):
            return self._global
        return self._personal_model if self._ditto else None

    def _mixing(self, view: ModelView) -> bool:
        return self._ditto and view is ModelView.SERVED and 0.0 < self._serving_weight < 1.0

    # -- data -------------------------------------------------------------------------------

    def _prepare(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        return prepare_batch(self.manifest, batch)

    # -- training ---------------------------------------------------------------------------

    def _phases(self, budget: TrainBudget) -> list[tuple[ArtifactSetName, int]]:
        if self._hyper.mode is TrainingMode.FEDALT:
            return [(ArtifactSetName.PERSONAL, budget.head_epochs), (ArtifactSetName.SHARED, budget.epochs)]
        return [(ArtifactSetName.JOINT, budget.epochs)]

    def train(
        self,
        data: DataSource,
        budget: TrainBudget = TrainBudget(),
        *,
        rng: np.random.Generator | None = None,
    ) -> TrainReport:
        """Train within ``budget`` on ``data`` (shuffled with ``rng``; in order when None).

        Ditto: the global model's update first (``epochs``), then the personal
        model's (``personal_epochs``), both against this round's anchors.
        """
        report = self._run_phases(data, budget, self._phases(budget), rng)
        if not self._ditto:
            return report
        return _merged(report, self._train_personal_model(data, budget, rng))

    def _train_personal_model(self, data: DataSource, budget: TrainBudget, rng: np.random.Generator | None) -> TrainReport:
        trained = self._get(self._names)  # the global track after its local update: what the delta is made of
        self._load(self._personal_model)
        try:
            report = self._run_phases(data, budget, [(ArtifactSetName.DITTO, budget.head_epochs)], rng)
            self._personal_model = self._get(self._names)
        finally:
            self._load(trained)
        return report

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

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, data: DataSource, *, batch_size: int = 256, model: ModelView | str = ModelView.SERVED) -> EvalReport:
        """Mean loss and accuracy (classification) of ``model`` (see :class:`ModelView`) on ``data``.

        The loss is the eval graph's (including the proximal term when mu > 0),
        except for a Ditto mixture, whose loss is the mixture's task loss.
        """
        view = ModelView(model)
        kind = self._hyper.loss
        if self._mixing(view):
            out, y = self.model_outputs(data, model=view, batch_size=batch_size)
            if len(y) == 0:
                raise TrainingError("no data to evaluate")
            accuracy = correct_count(out, y, kind) / len(y) if kind is not LossKind.MSE else None
            return EvalReport(loss=output_loss(out, y, kind), accuracy=accuracy, examples=len(y))
        total_loss = 0.0
        correct = 0
        n = 0
        with self._holding(self._view_parameters(view)):
            for batch in data.batches(batch_size):
                x, y = self._prepare(batch)
                loss, out = self._backend.eval_step(x, y)
                total_loss += loss * x.shape[0]
                n += x.shape[0]
                correct += correct_count(out, y, kind)
        if n == 0:
            raise TrainingError("no data to evaluate")
        accuracy = correct / n if kind is not LossKind.MSE else None
        return EvalReport(loss=total_loss / n, accuracy=accuracy, examples=n)

    def model_outputs(self, data: DataSource, *, model: ModelView | str = ModelView.SERVED,
                      batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(outputs, labels) of ``model`` over ``data`` in order; outputs are logits for classification."""
        view = ModelView(model)
        if self._mixing(view):
            personal, y = self.model_outputs(data, model=ModelView.PERSONAL, batch_size=batch_size)
            global_, _ = self.model_outputs(data, model=ModelView.GLOBAL, batch_size=batch_size)
            return mix_outputs(personal, global_, self._serving_weight, self._hyper.loss), y
        outs, labels = [], []
        with self._holding(self._view_parameters(view)):
            for batch in data.batches(batch_size):
                x, y = self._prepare(batch)
                outs.append(self._backend.eval_step(x, y)[1])
                labels.append(y)
        if not outs:
            return np.zeros((0,), dtype=np.float32), np.zeros((0,), dtype=np.int64)
        return np.concatenate(outs), np.concatenate(labels)

    def predict(self, x: np.ndarray, *, batch_size: int = 256, model: ModelView | str = ModelView.SERVED) -> np.ndarray:
        """Outputs (logits for classification) of ``model``, by default the one the device uses."""
        x = np.asarray(x, dtype=np.float32)
        if self._hyper.loss is LossKind.CROSS_ENTROPY:
            dummy = np.zeros((x.shape[0],), dtype=np.int64)
        else:
            dummy = np.zeros((x.shape[0], *self.manifest.label.shape[1:]), dtype=np.float32)
        # The eval graph ends in the loss and needs labels; dummy labels only change the
        # discarded loss value, never the outputs.
        return self.model_outputs(ArrayDataSource(x, dummy), model=model, batch_size=batch_size)[0]

    # -- persistence --------------------------------------------------------------------------

    def export_state(self) -> TrainingState:
        """Parameters, anchors, every set's optimizer state and Ditto's personal model as backend-neutral named arrays (copies)."""
        state = self._backend.export_state()
        return replace(state, personal_model=self.get_personal_model()) if self._ditto else state

    def save_state(self) -> None:
        """Persist weights, optimizer state, the global reference and counters atomically (state format 2)."""
        if self._store is None:
            raise StateError("this trainer has no state_dir")
        arrays = self.export_state().to_arrays()

        def write(d: Path) -> None:
            with open(d / "state.npz", "wb") as fh:
                np.savez(fh, **arrays)  # type: ignore[arg-type]
            with open(d / "global.npz", "wb") as fh:
                np.savez(fh, **self._global)  # type: ignore[arg-type]

        meta = {"manifest_sha256": self.bundle.manifest_sha256, "round": self.round, "total_steps": self.total_steps,
                "state_format": STATE_FORMAT, "backend": self.backend_name.value}
        if self._ditto:
            meta["serving_weight"] = self._serving_weight
        self._store.save(write, meta)


def _merged(first: TrainReport, second: TrainReport) -> TrainReport:
    """One report for two consecutive training calls (losses weighted by examples)."""
    examples = first.examples + second.examples
    weighted = sum(r.mean_loss * r.examples for r in (first, second) if r.examples)
    return TrainReport(steps=first.steps + second.steps, examples=examples,
                       mean_loss=weighted / examples if examples else float("nan"), seconds=first.seconds + second.seconds,
                       phase_steps={**first.phase_steps, **second.phase_steps})
