"""One device's part of a federated round, shared by the MQTT agent and the simulator.

Receive the global shared weights, adopt them (weights, FedProx anchors, delta
reference), train within the budget, and return the shared-layer delta with
the sample count it should be weighted by. Personal weights stay in the trainer.
A device with a personal model (Ditto) and validation data then chooses, on
that data, how much of its personal and of the global model it serves
(:func:`choose_served_model`, :mod:`~device_agent.personalization.model_choice`).

After federation a device can also fine-tune the received model with early
stopping on its validation split (:func:`fine_tune_early_stopped`) and keep,
of its candidate models, the one that scores best there, ties going to its
own local model (:func:`validation_score` and
:func:`~device_agent.personalization.model_select.choose_model`).
"""

from __future__ import annotations

import contextlib

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from device_agent.data import DataSource
from device_agent.personalization.fedfomo import FomoUpdate, fomo_update
from device_agent.personalization.model_choice import DEFAULT_ALPHAS, MixtureChoice, choose_mixture
from device_agent.personalization.model_select import ModelScore, best_index, early_stop_epoch
from device_agent.trainer import DeviceTrainer, ModelView, TrainBudget, TrainReport


@dataclass(frozen=True, kw_only=True)
class LocalUpdate:
    """What a device sends after a round: its shared delta and how many examples back it.

    ``choice``: the served mixture it chose on its validation data (None: no choice made).
    """

    round_number: int
    delta: dict[str, np.ndarray]
    num_examples: int
    report: TrainReport
    choice: MixtureChoice | None = None


def train_local_round(
    trainer: DeviceTrainer,
    data: DataSource,
    *,
    global_params: Mapping[str, np.ndarray] | None,
    round_number: int,
    budget: TrainBudget,
    rng: np.random.Generator | None = None,
    validation: DataSource | None = None,
) -> LocalUpdate:
    """Adopt ``global_params`` (None: keep the device's current model), train, return the delta.

    With ``validation`` (non-empty) and a personal model, the device then
    chooses what it serves (:func:`choose_served_model`).
    """
    if global_params is not None:
        trainer.set_global(global_params, round_number=round_number)
    else:
        trainer.round = round_number
    report = trainer.train(data, budget, rng=rng)
    choice = None
    if validation is not None and trainer.has_personal_model and len(validation) > 0:
        choice = choose_served_model(trainer, validation)
    return LocalUpdate(round_number=round_number, delta=trainer.shared_delta(), num_examples=len(data), report=report,
                       choice=choice)


def choose_served_model(trainer: DeviceTrainer, validation: DataSource, *,
                        alphas: Sequence[float] = DEFAULT_ALPHAS) -> MixtureChoice:
    """Choose, on ``validation``, the weight of the personal model against the last received global one, and serve it.

    Both models' outputs are computed once; every weight in ``alphas`` is
    scored on them (:func:`~device_agent.personalization.model_choice.choose_mixture`)
    and the winner becomes :attr:`DeviceTrainer.serving_weight`. ValueError for a
    trainer without a personal model or empty validation data.
    """
    if not trainer.has_personal_model:
        raise ValueError("only a device with a personal model (Ditto) chooses a mixture")
    personal, labels = trainer.model_outputs(validation, model=ModelView.PERSONAL)
    global_, _ = trainer.model_outputs(validation, model=ModelView.GLOBAL)
    choice = choose_mixture(personal, global_, labels, trainer.manifest.hyperparameters.loss, alphas=alphas)
    trainer.set_serving_weight(choice.alpha)
    return choice


def combine_candidates_fomo(
    trainer: DeviceTrainer,
    candidates: Sequence[Mapping[str, np.ndarray]],
    validation: DataSource,
    *,
    round_number: int,
    keep_reference: bool = False,
) -> FomoUpdate:
    """FedFomo's device step: weigh peers' shared layers by what they do on *this* device's validation data.

    Each candidate's shared layers are evaluated next to the device's own
    personal head; the first-order weighted combination (Zhang et al., ICLR
    2021) becomes the device's new shared layers and its FedProx anchor and
    delta reference for the round. No better candidate: the model is unchanged.
    ``keep_reference``: only the shared layers change; anchors and delta
    reference stay (the MQTT agent's deltas are against the served model S_r).
    """
    own = trainer.get_shared()
    own_loss = trainer.evaluate(validation).loss
    losses = []
    for candidate in candidates:
        trainer.set_shared(candidate)
        losses.append(trainer.evaluate(validation).loss)
    update = fomo_update(own, candidates, own_loss=own_loss, candidate_losses=losses)
    if keep_reference:
        trainer.set_shared(update.parameters)
        trainer.round = round_number
    else:
        trainer.set_global(update.parameters, round_number=round_number)
    return update


def validation_score(trainer: DeviceTrainer, validation: DataSource, name: str) -> ModelScore:
    """What the model ``trainer`` serves scores on ``validation``, as a candidate called ``name``."""
    report = trainer.evaluate(validation)
    return ModelScore(name=name, accuracy=report.accuracy, loss=report.loss)


@dataclass(frozen=True, kw_only=True)
class EarlyStopped:
    """What :func:`fine_tune_early_stopped` kept: after ``epochs`` epochs (0: the model as received) of ``trained``.

    ``scores``: every epoch's validation score, epoch 0 first.
    """

    epochs: int
    trained: int
    score: ModelScore
    scores: tuple[ModelScore, ...]


def fine_tune_early_stopped(
    trainer: DeviceTrainer,
    data: DataSource,
    validation: DataSource,
    *,
    scope: Literal["head", "all"],
    max_epochs: int,
    patience: int = 3,
    batch_size: int = 32,
    learning_rate: float | None = None,
    rng: np.random.Generator | None = None,
    fresh_optimizer: bool = True,
) -> EarlyStopped:
    """Fine-tune the model the trainer holds one epoch at a time and keep the epoch that scores best on ``validation``.

    ``scope="head"`` trains the bundle's ``finetune`` set (:meth:`DeviceTrainer.fine_tune`),
    ``"all"`` every trainable parameter (:meth:`DeviceTrainer.train`, not for Ditto bundles).
    Epoch 0 (the model as received) is a candidate; an epoch must score strictly better to
    replace the best, and training stops after ``patience`` epochs without one, or at
    ``max_epochs``. The trainer is left holding the kept weights (anchors and the delta
    reference are not touched). ``fresh_optimizer``: fine-tune from step 0 with zero AdamW
    moments (:meth:`DeviceTrainer.fresh_optimizers`; the device's own optimizer state is
    back afterwards), not from the moments its federated rounds or an earlier fine-tuning
    left (measured in docs/personalization.md). ValueError for empty validation data or a bad scope.
    """
    if len(validation) == 0:
        raise ValueError("early stopping needs validation data")
    if max_epochs < 0:
        raise ValueError("max_epochs must be >= 0")
    if scope not in ("head", "all") or (scope == "all" and trainer.has_personal_model):
        raise ValueError(f"scope {scope!r}: use 'head', or 'all' on a bundle without a Ditto personal model")
    budget = TrainBudget(epochs=1, batch_size=batch_size, learning_rate=learning_rate)

    def weights() -> dict[str, np.ndarray]:
        return {**trainer.get_shared(), **trainer.get_personal()}

    scores = [validation_score(trainer, validation, "epoch 0")]
    best_weights, best = weights(), 0
    with trainer.fresh_optimizers() if fresh_optimizer else contextlib.nullcontext():
        for epoch in range(1, max_epochs + 1):
            if scope == "head":
                trainer.fine_tune(data, budget, rng=rng)
            else:
                trainer.train(data, budget, rng=rng)
            scores.append(validation_score(trainer, validation, f"epoch {epoch}"))
            if best_index(scores) == epoch:
                best_weights, best = weights(), epoch
            if early_stop_epoch(scores, patience=patience) is not None:
                break
    trainer.set_shared({n: best_weights[n] for n in trainer.manifest.shared_names})
    if trainer.manifest.personal_names:
        trainer.set_personal({n: best_weights[n] for n in trainer.manifest.personal_names})
    return EarlyStopped(epochs=best, trained=len(scores) - 1, score=scores[best], scores=tuple(scores))
