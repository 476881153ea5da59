"""An in-process federated simulator: real on-device trainers, the real aggregation rules.

Each simulated device is a :class:`~device_agent.trainer.DeviceTrainer` on the
same signed bundle a real device would run, doing the same
:func:`~device_agent.local_round.train_local_round`; the server side uses the
same :mod:`sdk.aggregation` rules as the regional aggregator. Only the
transport (MQTT, envelopes) is left out. A fixed seed gives identical results.

Per round: sample devices (``participation``), mark some as dropouts (send
nothing) and some as stragglers (their step budget is cut to
``straggler_work`` of a full budget). ``straggler_policy="drop"`` discards
straggler updates as FedAvg does in Li et al. (2020); ``"partial"`` accepts
partial work as FedProx does.

FedFomo (``fomo_candidates=k``) replaces server averaging: the server keeps
every device's latest shared layers, each selected device asks for k of them
(epsilon-greedy on its affinity vector), combines them with
:func:`~device_agent.local_round.combine_candidates_fomo` on its validation
split, trains, and uploads its own shared layers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from device_agent.bundle.archive import TrainingBundle
from device_agent.data import ArrayDataSource
from device_agent.local_round import combine_candidates_fomo, train_local_round
from device_agent.personalization.fedfomo import exploration_rate, select_candidates, update_affinity
from device_agent.trainer import DeviceTrainer, TrainBudget
from sdk.aggregation import AggregationConfig, make_rule
from sdk.datasets.federated import FederatedDataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    """How a simulated federation runs.

    ``federated=False`` is the local-only baseline: devices train on their own
    data every round and nothing is aggregated.
    """

    rounds: int
    budget: TrainBudget = TrainBudget()
    participation: float = 1.0
    straggler_fraction: float = 0.0
    straggler_work: float = 0.5
    straggler_policy: Literal["drop", "partial"] = "partial"
    dropout_fraction: float = 0.0
    aggregation: AggregationConfig = AggregationConfig()
    federated: bool = True
    fomo_candidates: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0")
        for name in ("participation", "straggler_fraction", "straggler_work", "dropout_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.participation == 0:
            raise ValueError("participation must be > 0")
        if self.fomo_candidates is not None and self.fomo_candidates < 1:
            raise ValueError("fomo_candidates must be >= 1")
        if self.straggler_policy not in ("drop", "partial"):
            raise ValueError("straggler_policy must be 'drop' or 'partial'")


@dataclass(frozen=True, kw_only=True)
class RoundRecord:
    """Metrics of one round. Accuracies are per device on its own test split."""

    round_number: int
    selected: tuple[str, ...]
    aggregated: tuple[str, ...]
    dropped: dict[str, str]
    personalised_accuracy: dict[str, float]
    mean_accuracy: float
    bytes_up_per_device: int
    bytes_down_per_device: int
    seconds: float


@dataclass(frozen=True, kw_only=True)
class SimulationResult:
    """Everything a run produced; ``final_accuracy`` is per device after the last round."""

    rounds: tuple[RoundRecord, ...]
    final_accuracy: dict[str, float]
    global_params: dict[str, np.ndarray] = field(repr=False)

    @property
    def mean_final_accuracy(self) -> float:
        """Unweighted mean over devices of the final personalised test accuracy."""
        return float(np.mean(list(self.final_accuracy.values())))


def _full_steps(n: int, budget: TrainBudget) -> int:
    return max(1, budget.epochs) * math.ceil(n / budget.batch_size)


class FederatedSimulator:
    """Runs ``config.rounds`` rounds of the bundle's training mode over ``dataset``'s clients."""

    def __init__(self, bundle: TrainingBundle, dataset: FederatedDataset, config: SimulationConfig, *, threads: int = 1) -> None:
        self.bundle = bundle
        self.dataset = dataset
        self.config = config
        self._trainers = {c.client_id: DeviceTrainer(bundle, threads=threads) for c in dataset.clients}
        self._train = {c.client_id: ArrayDataSource(c.train.x, c.train.y) for c in dataset.clients}
        self._test = {c.client_id: ArrayDataSource(c.test.x, c.test.y) for c in dataset.clients}
        self._val = {c.client_id: ArrayDataSource(c.val.x, c.val.y) for c in dataset.clients}
        first = next(iter(self._trainers.values()))
        self.global_params = first.get_shared()
        self._shapes = {n: v.shape for n, v in self.global_params.items()}
        self._bytes_per_update = sum(v.nbytes for v in self.global_params.values())
        # FedFomo server state: every device's latest upload and each device's affinity to its peers.
        self._uploads = {cid: dict(self.global_params) for cid in self._trainers}
        self._affinity = {cid: np.zeros(len(self._trainers)) for cid in self._trainers}
        if config.fomo_candidates is not None:
            empty = [c.client_id for c in dataset.clients if len(c.val.y) == 0]
            if empty:
                raise ValueError(f"FedFomo needs a validation split on every device; empty for {empty}")

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, *keys])

    def run_round(self, round_number: int) -> RoundRecord:
        """Select, train, aggregate and evaluate one round."""
        cfg = self.config
        start = time.perf_counter()
        ids = [c.client_id for c in self.dataset.clients]
        rng = self._rng(round_number, 0)
        k = max(1, round(cfg.participation * len(ids)))
        selected = sorted(rng.choice(ids, size=k, replace=False).tolist(), key=ids.index)
        n_drop = int(round(cfg.dropout_fraction * k))
        n_slow = int(round(cfg.straggler_fraction * k))
        order = rng.permutation(k)
        dropouts = {selected[i] for i in order[:n_drop]}
        stragglers = {selected[i] for i in order[n_drop:n_drop + n_slow]}
        rule = make_rule(cfg.aggregation, expected_shapes=self._shapes)
        aggregated, dropped = [], {}
        for index, cid in enumerate(ids):
            if cid not in selected:
                continue
            if cid in dropouts:
                dropped[cid] = "dropout"
                continue
            budget = cfg.budget
            if cid in stragglers:
                if cfg.straggler_policy == "drop" and cfg.federated:
                    dropped[cid] = "straggler"
                    continue
                cap = max(1, int(cfg.straggler_work * _full_steps(len(self._train[cid]), budget)))
                budget = TrainBudget(epochs=budget.epochs, batch_size=budget.batch_size, max_steps=cap,
                                     personal_epochs=budget.personal_epochs, learning_rate=budget.learning_rate)
            if cfg.fomo_candidates is not None:
                self._combine_fomo(cid, index, ids, round_number)
            update = train_local_round(
                self._trainers[cid], self._train[cid],
                global_params=self.global_params if cfg.federated and cfg.fomo_candidates is None else None,
                round_number=round_number, budget=budget, rng=self._rng(round_number, 1, index),
            )
            if cfg.fomo_candidates is not None:
                self._uploads[cid] = self._trainers[cid].get_shared()
            elif cfg.federated:
                rule.accumulate(update.delta, float(update.num_examples))
            aggregated.append(cid)
        if cfg.federated and cfg.fomo_candidates is None:
            mean_delta = rule.finalize()
            if mean_delta is not None:
                self.global_params = {n: (v + mean_delta[n]).astype(np.float32) for n, v in self.global_params.items()}
            for cid, trainer in self._trainers.items():
                trainer.set_global(self.global_params, round_number=round_number)
        accuracy = {cid: float(self._trainers[cid].evaluate(self._test[cid]).accuracy or 0.0) for cid in ids}
        return RoundRecord(
            round_number=round_number, selected=tuple(selected), aggregated=tuple(aggregated), dropped=dropped,
            personalised_accuracy=accuracy, mean_accuracy=float(np.mean(list(accuracy.values()))),
            bytes_up_per_device=self._bytes_per_update if cfg.federated else 0,
            bytes_down_per_device=self._bytes_per_update * (cfg.fomo_candidates or 1) if cfg.federated else 0,
            seconds=time.perf_counter() - start,
        )

    def _combine_fomo(self, cid: str, index: int, ids: list[str], round_number: int) -> None:
        k = min(self.config.fomo_candidates or 0, len(ids) - 1)
        if k == 0:
            return
        picked = select_candidates(self._affinity[cid], k=k, epsilon=exploration_rate(round_number),
                                   rng=self._rng(round_number, 2, index), exclude={index})
        candidates = [self._uploads[ids[j]] for j in picked]
        update = combine_candidates_fomo(self._trainers[cid], candidates, self._val[cid], round_number=round_number)
        self._affinity[cid] = update_affinity(self._affinity[cid], picked, update.weights)

    def run(self, *, on_round: Callable[[RoundRecord], None] | None = None) -> SimulationResult:
        """All rounds; ``on_round`` (e.g. a progress bar) is called after each."""
        records = []
        for r in range(self.config.rounds):
            record = self.run_round(r)
            records.append(record)
            logger.info("round %d: mean accuracy %.4f, %d aggregated, %d dropped", r, record.mean_accuracy,
                        len(record.aggregated), len(record.dropped))
            if on_round is not None:
                on_round(record)
        final = records[-1].personalised_accuracy if records else {
            cid: float(t.evaluate(self._test[cid]).accuracy or 0.0) for cid, t in self._trainers.items()}
        return SimulationResult(rounds=tuple(records), final_accuracy=final, global_params=dict(self.global_params))
