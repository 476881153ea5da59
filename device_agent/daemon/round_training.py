"""Phase 2 of a round: fresh local data, training within the budget, the status after training.

:class:`RoundTraining` holds the data loaders, the budget and the batch
RNG; the agent passes the trainer it currently runs (a release may switch it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from device_agent.daemon.config import AgentConfig
from device_agent.daemon.status_reporter import StatusReporter
from device_agent.data import DataSource
from device_agent.errors import TrainingError
from device_agent.local_round import LocalUpdate, train_local_round
from device_agent.protocol.envelope import OpenedModel
from device_agent.trainer import DeviceTrainer, TrainReport

logger = logging.getLogger(__name__)

_NOT_TRAINED = TrainReport(steps=0, examples=0, mean_loss=float("nan"), seconds=0.0)


class RoundTraining:
    """Trains one device's rounds; ``load_data`` is called for every round, so new local data is picked up.

    ``train_rng`` shuffles batches (None: in order); ``load_validation`` (None:
    no validation data) measures the accuracy the status reports and lets a
    device with a personal model choose what it serves.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        load_data: Callable[[], DataSource],
        load_validation: Callable[[], DataSource] | None,
        train_rng: np.random.Generator | None,
        status: StatusReporter,
    ) -> None:
        self._config = config
        self._load_data = load_data
        self._load_validation = load_validation
        self._train_rng = train_rng
        self._status = status

    def local_data(self) -> DataSource:
        """The device's local data now; TrainingError when it cannot be read."""
        try:
            return self._load_data()
        except (OSError, ValueError) as exc:
            raise TrainingError(f"cannot load the local data: {exc}") from exc

    def train(self, trainer: DeviceTrainer, model: OpenedModel, data: DataSource, *, from_model: bool) -> LocalUpdate:
        """Train ``trainer`` on ``data`` for ``model``'s round within the budget, then save its state.

        ``from_model`` False: the trainer already holds what it trains from (FedFomo's combination).
        """
        update = train_local_round(
            trainer,
            data,
            global_params=model.tensors if from_model else None,
            round_number=model.header.round,
            budget=self._config.budget,
            rng=self._train_rng,
            validation=self._choice_validation(trainer),
        )
        trainer.save_state()
        logger.info("round %d: trained %d steps on %d examples (mean loss %.4f)",
                    update.round_number, update.report.steps, update.num_examples, update.report.mean_loss)
        if update.choice is not None:
            logger.info("round %d: serving %s (personal weight %.1f), chosen on %d validation examples",
                        update.round_number, update.choice.picked, update.choice.alpha, update.choice.examples)
        return update

    def saved_update(self, trainer: DeviceTrainer, number: int) -> LocalUpdate:
        """Round ``number``'s update from the delta ``trainer`` saved before a restart (nothing is trained)."""
        return LocalUpdate(round_number=number, delta=trainer.shared_delta(), num_examples=len(self.local_data()),
                           report=_NOT_TRAINED)

    def report(self, trainer: DeviceTrainer, number: int, report: TrainReport) -> None:
        """Status after training: the round, its mean loss and (with validation data) the validation accuracy."""
        accuracy = None
        if self._load_validation is not None:
            try:
                accuracy = trainer.evaluate(self._load_validation()).accuracy
            except (OSError, ValueError, TrainingError) as exc:
                logger.warning("round %d: validation accuracy not measured: %s", number, exc)
        self._status.update(last_round=number, last_round_status="trained", last_round_reason="",
                            last_loss=report.mean_loss, last_val_accuracy=accuracy)

    def _choice_validation(self, trainer: DeviceTrainer) -> DataSource | None:
        """Validation data for a device with a personal model (Ditto) to choose what it serves; None otherwise."""
        if not trainer.has_personal_model or self._load_validation is None:
            return None
        try:
            return self._load_validation()
        except (OSError, ValueError) as exc:
            logger.warning("cannot load the validation data; the served model stays as it was: %s", exc)
            return None
