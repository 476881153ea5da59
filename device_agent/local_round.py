"""One device's part of a federated round, shared by the MQTT agent and the simulator.

Receive the global shared weights, adopt them (weights, FedProx anchors, delta
reference), train within the budget, and return the shared-layer delta with
the sample count it should be weighted by. Personal weights stay in the trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from device_agent.data import DataSource
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
