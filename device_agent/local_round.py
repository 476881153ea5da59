"""One device's part of a federated round, shared by the MQTT agent and the simulator.

Receive the global shared weights, adopt them (weights, FedProx anchors, delta
reference), train within the budget, and return the shared-layer delta with
the sample count it should be weighted by. Personal weights stay in the trainer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from device_agent.data import DataSource
from device_agent.personalization.fedfomo import FomoUpdate, fomo_update
from device_agent.trainer import DeviceTrainer, TrainBudget, TrainReport


@dataclass(frozen=True, kw_only=True)
class LocalUpdate:
    """What a device sends after a round: its shared delta and how many examples back it."""

    round_number: int
    delta: dict[str, np.ndarray]
    num_examples: int
    report: TrainReport


def train_local_round(
    trainer: DeviceTrainer,
    data: DataSource,
    *,
    global_params: Mapping[str, np.ndarray] | None,
    round_number: int,
    budget: TrainBudget,
    rng: np.random.Generator | None = None,
) -> LocalUpdate:
    """Adopt ``global_params`` (None: keep the device's current model), train, return the delta."""
    if global_params is not None:
        trainer.set_global(global_params, round_number=round_number)
    else:
        trainer.round = round_number
    report = trainer.train(data, budget, rng=rng)
    return LocalUpdate(round_number=round_number, delta=trainer.shared_delta(), num_examples=len(data), report=report)


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
