"""Cold start: a device that joins a running fleet with a handful of labelled examples.

After round R of a fleet run, each newcomer (a client that never took part)
takes ``n`` of its training examples (a seeded random choice, the same ``n``
examples at every join round) and is scored on its whole test split three ways:

- ``zero_shot``: the fleet's global model as it is (only when the global model
  is a whole model: a bundle without a personal head);
- ``fleet``: the global model plus a few epochs on its head only (the bundle's
  ``finetune`` set: the head trains, everything else stays the fleet's);
- ``local``: a model trained from the bundle's initial weights on the same
  ``n`` examples alone, for ``local_epochs`` epochs (a bundle that trains one
  joint set; other modes leave it None).

This is what the device gains on its first day in the fleet over training alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from device_agent.bundle.archive import TrainingBundle
from device_agent.bundle.manifest import ArtifactSetName, TrainingMode
from device_agent.data import ArrayDataSource
from device_agent.trainer import DeviceTrainer, TrainBudget
from sdk.datasets.federated import ClientData

_SEED_TAG = 0xC01D


@dataclass(frozen=True, kw_only=True)
class ColdStartConfig:
    """When newcomers join and what they train.

    ``join_rounds``: evaluate after this many completed fleet rounds (each
    in 1..rounds). ``samples``: the newcomer's labelled examples. The head
    trains ``head_epochs`` epochs on them; local-only trains ``local_epochs``.
    """

    join_rounds: tuple[int, ...]
    samples: tuple[int, ...] = (10, 50, 100)
    head_epochs: int = 10
    local_epochs: int = 60
    batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("join_rounds", "samples"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not self.join_rounds or min(self.join_rounds) < 1:
            raise ValueError("join_rounds must name rounds >= 1")
        if not self.samples or min(self.samples) < 1:
            raise ValueError("samples must be >= 1")
        if self.head_epochs < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("head_epochs, local_epochs and batch_size must be >= 1")


@dataclass(frozen=True, kw_only=True)
class NewcomerResult:
    """One newcomer with ``samples`` examples joining after ``join_round`` rounds: test accuracies (None: not applicable)."""

    device: str
    join_round: int
    samples: int
    zero_shot: float | None
    fleet: float
    local: float | None


def newcomer_indices(n_train: int, samples: int, *, seed: int, index: int) -> np.ndarray:
    """The training examples a newcomer keeps: ``samples`` of ``n_train`` (all when fewer), seeded by run seed and newcomer."""
    rng = np.random.default_rng([seed, _SEED_TAG, index])
    order = rng.permutation(n_train)
    return np.sort(order[:min(samples, n_train)])


class NewcomerBench:
    """Scores newcomers against a fleet's global models; local-only results are computed once and kept."""

    def __init__(self, bundle: TrainingBundle, newcomers: Sequence[ClientData], config: ColdStartConfig, *, seed: int,
                 threads: int = 1) -> None:
        if bundle.manifest.hyperparameters.mode is TrainingMode.DITTO or not newcomers:
            raise ValueError("cold start needs newcomers and a fedavg/fedprox/fedsim/fedalt bundle")
        if ArtifactSetName.FINETUNE not in bundle.manifest.set_names:
            raise ValueError("cold start trains the newcomer's head: the bundle needs a 'finetune' set (TrainingSpec(finetune=...))")
        self.bundle = bundle
        self.newcomers = tuple(newcomers)
        self.config = config
        self.seed = seed
        self.threads = threads
        self._local: dict[tuple[str, int], float | None] = {}

    def _data(self, index: int, client: ClientData, samples: int) -> ArrayDataSource:
        keep = newcomer_indices(len(client.train), samples, seed=self.seed, index=index)
        return ArrayDataSource(client.train.x[keep], client.train.y[keep])

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SEED_TAG, *keys])

    def _local_accuracy(self, index: int, client: ClientData, samples: int) -> float | None:
        key = (client.client_id, samples)
        if key not in self._local:
            trainer = DeviceTrainer(self.bundle, threads=self.threads)
            if trainer.manifest.hyperparameters.mode is TrainingMode.FEDALT:
                self._local[key] = None  # alternating phases are not plain local training; the fedavg run reports it
            else:
                budget = TrainBudget(epochs=self.config.local_epochs, batch_size=self.config.batch_size)
                trainer.train(self._data(index, client, samples), budget, rng=self._rng(1, index, samples))
                self._local[key] = _accuracy(trainer, client)
        return self._local[key]

    def evaluate(self, global_params: Mapping[str, np.ndarray], *, join_round: int) -> list[NewcomerResult]:
        """Every newcomer at every sample size, joining a fleet whose global shared layers are ``global_params``."""
        out = []
        whole = not self.bundle.manifest.personal_names
        for index, client in enumerate(self.newcomers):
            for samples in self.config.samples:
                trainer = DeviceTrainer(self.bundle, threads=self.threads)
                trainer.set_global(global_params, round_number=join_round)
                zero_shot = _accuracy(trainer, client) if whole else None
                budget = TrainBudget(epochs=self.config.head_epochs, batch_size=self.config.batch_size)
                trainer.fine_tune(self._data(index, client, samples), budget, rng=self._rng(2, index, samples, join_round))
                out.append(NewcomerResult(device=client.client_id, join_round=join_round, samples=samples, zero_shot=zero_shot,
                                          fleet=_accuracy(trainer, client), local=self._local_accuracy(index, client, samples)))
        return out


def _accuracy(trainer: DeviceTrainer, client: ClientData) -> float:
    return float(trainer.evaluate(ArrayDataSource(client.test.x, client.test.y)).accuracy or 0.0)
