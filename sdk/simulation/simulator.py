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
split, trains, and uploads its own shared layers. Each round records which
devices kept only their own model (no peer helped on their validation split):
:attr:`SimulationResult.fomo_kept_own_rate` says how often, per device.

Validation: a client whose data has no validation split gets one made from
its training split (:func:`~sdk.datasets.holdout.ensure_validation_split`,
``validation_fraction`` of it, seeded), for every algorithm alike, so all
methods train on the same examples; :attr:`SimulationResult.validation`
says what was held out.

Hierarchy (``hierarchy=HierarchyConfig(...)``) runs the deployment's two
tiers over the clients' ``region`` labels with the same pure functions as
the regional and root aggregators: region ``j`` serves
``S_j = mix_regional(R_j, G, a)``, aggregates its devices' deltas into
``D_j``, keeps ``R_j = S_j + D_j``, and the root sets
``G = G + combine_regions(D, n)``. ``a = 0`` is hierarchical FedAvg (which,
weighted by samples, equals flat FedAvg).

Ditto (a ``ditto`` bundle) averages the global track like FedAvg; every
device also trains its personal model and, on its validation split, chooses
the mixture of personal and global outputs it serves
(:func:`~device_agent.local_round.choose_served_model`, called by
``train_local_round``); :attr:`RoundMetrics.serving_weight` records each
device's choice and :attr:`RoundMetrics.personal_model_accuracy` the personal
model alone.

Evaluation, per device on its own test split: ``personalised_accuracy`` is
the model the device holds after the round (the served model plus its
personal head, its own model for local-only and FedFomo, Ditto's chosen
mixture);
``global_accuracy`` is the root's shared layers (plus the device's head,
if any); ``regional_accuracy`` its region's model. ``finetune_epochs`` > 0
adds, after the last round, FedAvg+FT: the device fine-tunes the received
model locally, the head only (bundles with a ``finetune`` set) and every
parameter (bundles without personal layers), and is evaluated.
``choice_epochs`` > 0 adds, after the last round, the per-device choice
against training alone (:mod:`sdk.simulation.local_choice`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from device_agent.bundle.archive import TrainingBundle
from device_agent.data import ArrayDataSource
from device_agent.local_round import combine_candidates_fomo, train_local_round
from device_agent.personalization.fedfomo import exploration_rate, select_candidates, update_affinity
from device_agent.personalization.model_choice import correct_count, mix_outputs
from device_agent.trainer import DeviceTrainer, ModelView, TrainBudget
from sdk.aggregation import combine_regions, make_rule, mix_regional
from sdk.datasets.federated import ClientData, FederatedDataset
from sdk.datasets.holdout import ensure_validation_split
from sdk.simulation.checkpoint import SimulationCheckpoint
from sdk.simulation.cold_start import NewcomerBench, NewcomerResult
from sdk.simulation.config import HierarchyConfig, SimulationConfig
from sdk.simulation.local_choice import choose_against_local
from sdk.simulation.results import RoundMetrics, SimulationResult
from sdk.simulation.traffic import Downlink, Uplink

__all__ = ["FederatedSimulator", "HierarchyConfig", "RoundMetrics", "SimulationConfig", "SimulationResult"]

ParameterDict = dict[str, np.ndarray]


logger = logging.getLogger(__name__)


def _full_steps(n: int, budget: TrainBudget) -> int:
    return max(1, budget.epochs) * math.ceil(n / budget.batch_size)


class FederatedSimulator:
    """Runs ``config.rounds`` rounds of the bundle's training mode over ``dataset``'s clients.

    ``checkpoint``: save each round's metrics and, every ``checkpoint.every``
    rounds, the whole fleet there, and resume from what is saved (not for FedFomo
    or compressed traffic, whose server-side state is not saved).
    ``newcomers``: clients outside the fleet that join it per ``config.cold_start``
    (:mod:`sdk.simulation.cold_start`; averaging algorithms only).
    """

    def __init__(self, bundle: TrainingBundle, dataset: FederatedDataset, config: SimulationConfig, *, threads: int = 1,
                 checkpoint: SimulationCheckpoint | None = None, newcomers: Sequence[ClientData] = (),
                 local_bundle: TrainingBundle | None = None) -> None:
        self.bundle = bundle
        if config.choice_epochs and local_bundle is None:
            raise ValueError("choice_epochs needs the local-only bundle (local_bundle) to train each device's fallback model")
        self._local_bundle = local_bundle
        self._threads = threads
        self.validation = ensure_validation_split(dataset, fraction=config.validation_fraction, seed=config.seed)
        if self.validation.held_out:
            logger.info("%s", self.validation.describe())
        dataset = self.validation.dataset
        self.dataset = dataset
        self.config = config
        if checkpoint is not None and config.fomo_candidates is not None:
            raise ValueError("FedFomo runs cannot be checkpointed (its peer uploads and affinities are not saved)")
        if checkpoint is not None and (config.compression.enabled or config.downlink_compression.enabled):
            raise ValueError("compressed runs cannot be checkpointed (the error-feedback residuals are not saved)")
        self._checkpoint = checkpoint
        self._newcomers: NewcomerBench | None = None
        if config.cold_start is not None:
            if not (config.federated and config.fomo_candidates is None and config.hierarchy is None):
                raise ValueError("cold start joins a flat averaging fleet (not local-only, FedFomo or a hierarchy)")
            self._newcomers = NewcomerBench(bundle, newcomers, config.cold_start, seed=config.seed, threads=threads)
        self._resume_after = None if checkpoint is None else checkpoint.committed_round([c.client_id for c in dataset.clients])
        self._trainers = {c.client_id: DeviceTrainer(bundle, threads=threads,
                                                     state_dir=None if checkpoint is None else checkpoint.device_dir(c.client_id))
                          for c in dataset.clients}
        self._train = {c.client_id: ArrayDataSource(c.train.x, c.train.y) for c in dataset.clients}
        self._test = {c.client_id: ArrayDataSource(c.test.x, c.test.y) for c in dataset.clients}
        self._val = {c.client_id: ArrayDataSource(c.val.x, c.val.y) for c in dataset.clients}
        first = next(iter(self._trainers.values()))
        self._ditto = first.has_personal_model
        if self._ditto and (config.hierarchy is not None or config.fomo_candidates is not None or not config.federated):
            raise ValueError("a ditto bundle runs flat averaging only (no hierarchy, FedFomo or local-only)")
        self.global_params = first.get_shared()
        self._shapes = {n: v.shape for n, v in self.global_params.items()}
        self._uplink = Uplink(config.compression)
        self._downlink = Downlink(self.global_params, config.downlink_compression)
        # FedFomo server state: every device's latest upload and each device's affinity to its peers.
        # Flat runs treat the whole fleet as one unnamed region whatever the dataset's labels.
        self._region = {c.client_id: (c.region or "") if config.hierarchy is not None else "" for c in dataset.clients}
        if config.hierarchy is not None and any(c.region is None for c in dataset.clients):
            raise ValueError("a hierarchy needs a region on every client; load the dataset with regions")
        self._regional: dict[str, ParameterDict | None] = {r: None for r in sorted(set(self._region.values()))}
        self._test_examples = {cid: len(c.test.y) for cid, c in ((c.client_id, c) for c in dataset.clients)}
        self._uploads = {cid: dict(self.global_params) for cid in self._trainers}
        self._affinity = {cid: np.zeros(len(self._trainers)) for cid in self._trainers}
        if config.fomo_candidates is not None:
            empty = [c.client_id for c in dataset.clients if len(c.val.y) == 0]
            if empty:
                raise ValueError(f"FedFomo needs a validation split on every device; empty for {empty}"
                                 " (a client needs at least 2 training examples to have one made)")

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, *keys])

    def _averaging(self) -> bool:
        return self.config.federated and self.config.fomo_candidates is None

    def _served(self, cid: str) -> ParameterDict:
        """The shared weights device ``cid`` trains from: the global model, or its region's mix."""
        h = self.config.hierarchy
        if h is None:
            return self._downlink.held
        return mix_regional(self._regional[self._region[cid]], self.global_params, regional_weight=h.regional_weight)

    def run_round(self, round_number: int) -> RoundMetrics:
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
        served = {r: self._served(cid) for cid, r in self._region.items()}  # one model per region
        rules = {r: make_rule(cfg.aggregation, expected_shapes=self._shapes) for r in self._regional}
        samples = dict.fromkeys(self._regional, 0)
        aggregated, dropped = [], {}
        sent: list[int] = []
        received = self._downlink.last_bytes
        combined: list[str] = []
        kept_own: list[str] = []
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
                kept = self._combine_fomo(cid, index, ids, round_number)
                if kept is not None:
                    combined.append(cid)
                    if kept:
                        kept_own.append(cid)
            region = self._region[cid]
            update = train_local_round(
                self._trainers[cid], self._train[cid],
                global_params=served[region] if self._averaging() else None,
                round_number=round_number, budget=budget, rng=self._rng(round_number, 1, index), validation=self._val[cid],
            )
            if cfg.fomo_candidates is not None:
                self._uploads[cid] = self._trainers[cid].get_shared()
                sent.append(self._downlink.full_bytes)  # FedFomo uploads the whole shared model, uncompressed
            elif cfg.federated:
                decoded, size = self._uplink.send(cid, update.delta)
                sent.append(size)
                rules[region].accumulate(decoded, float(update.num_examples))
                samples[region] += update.num_examples
            aggregated.append(cid)
        if self._averaging():
            self._aggregate(rules, samples, served)
            if cfg.hierarchy is None:
                self._downlink.publish(self.global_params)
            for cid, trainer in self._trainers.items():
                trainer.set_global(self._served(cid), round_number=round_number)
        own: dict[str, float] = {}
        if self._ditto:
            personal, server, own = self._evaluate_ditto()
        else:
            personal = self._evaluate()
            # Flat averaging: every device holds the global shared layers already.
            server = {} if not self._averaging() else (
                dict(personal) if cfg.hierarchy is None else self._evaluate(lambda cid: self.global_params))
        regional = ({} if cfg.hierarchy is None else
                    self._evaluate(lambda cid: self._regional[self._region[cid]] or self.global_params))
        return RoundMetrics(
            round_number=round_number, selected=tuple(selected), aggregated=tuple(aggregated), dropped=dropped,
            personalised_accuracy=personal, mean_accuracy=float(np.mean(list(personal.values()))),
            pooled_accuracy=self._pooled(personal), global_accuracy=server, regional_accuracy=regional,
            bytes_up_per_device=(round(float(np.mean(sent))) if sent else 0) if cfg.federated else 0,
            bytes_down_per_device=received * (cfg.fomo_candidates or 1) if cfg.federated else 0,
            seconds=time.perf_counter() - start, fomo_combined=tuple(combined), fomo_kept_own=tuple(kept_own),
            personal_model_accuracy=own,
            serving_weight={cid: t.serving_weight for cid, t in self._trainers.items()} if self._ditto else {},
        )

    def _aggregate(self, rules: dict, samples: dict[str, int], served: dict[str, ParameterDict]) -> None:
        """The regional and root aggregators' arithmetic (flat: one unnamed region, G += D)."""
        h = self.config.hierarchy
        means = {r: rule.finalize() for r, rule in rules.items()}
        if h is None:
            mean = means[""]
            if mean is not None:
                self.global_params = {n: (v + mean[n]).astype(np.float32) for n, v in self.global_params.items()}
            return
        for r, mean in means.items():
            base = served[r]
            self._regional[r] = dict(base) if mean is None else {n: (v + mean[n]).astype(np.float32) for n, v in base.items()}
        order = sorted(means)
        combined = combine_regions([means[r] for r in order], [float(samples[r]) if means[r] is not None else 0.0 for r in order],
                                   by=h.region_weighting)
        if combined is not None:
            self.global_params = {n: (v + combined[n]).astype(np.float32) for n, v in self.global_params.items()}

    def _evaluate(self, shared_for: Callable[[str], ParameterDict] | None = None) -> dict[str, float]:
        """Per-device test accuracy of the device's model, or with its shared layers swapped for ``shared_for(cid)``."""
        out = {}
        for cid, trainer in self._trainers.items():
            if shared_for is None:
                out[cid] = float(trainer.evaluate(self._test[cid]).accuracy or 0.0)
                continue
            own = trainer.get_shared()
            trainer.set_shared(shared_for(cid))
            out[cid] = float(trainer.evaluate(self._test[cid]).accuracy or 0.0)
            trainer.set_shared(own)
        return out

    def _evaluate_ditto(self) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """Ditto: per device, the served mixture, the global model and the personal model alone, from two passes."""
        served, global_, own = {}, {}, {}
        for cid, trainer in self._trainers.items():
            kind = trainer.manifest.hyperparameters.loss
            personal, y = trainer.model_outputs(self._test[cid], model=ModelView.PERSONAL)
            server, _ = trainer.model_outputs(self._test[cid], model=ModelView.GLOBAL)
            n = max(1, len(y))
            own[cid] = correct_count(personal, y, kind) / n
            global_[cid] = correct_count(server, y, kind) / n
            served[cid] = correct_count(mix_outputs(personal, server, trainer.serving_weight, kind), y, kind) / n
        return served, global_, own

    def _pooled(self, accuracy: dict[str, float]) -> float:
        total = sum(self._test_examples[c] for c in accuracy)
        return float(sum(accuracy[c] * self._test_examples[c] for c in accuracy) / total) if total else 0.0

    def _fine_tune(self) -> dict[str, dict[str, float]]:
        """FedAvg+FT after the last round: tune the held model locally, evaluate, put it back."""
        cfg = self.config
        first = next(iter(self._trainers.values()))
        kinds = []
        if first.can_fine_tune:
            kinds.append("head")
        if not first.manifest.personal_names and cfg.federated:
            kinds.append("all")
        budget = TrainBudget(epochs=cfg.finetune_epochs, batch_size=cfg.budget.batch_size, learning_rate=cfg.budget.learning_rate)
        out: dict[str, dict[str, float]] = {}
        for kind in kinds:
            out[kind] = {}
            for index, (cid, trainer) in enumerate(self._trainers.items()):
                held, reference = trainer.get_shared(), trainer.global_reference
                rng = self._rng(cfg.rounds, 3, index)
                if kind == "head":
                    trainer.fine_tune(self._train[cid], budget, rng=rng)
                else:
                    trainer.train(self._train[cid], budget, rng=rng)
                out[kind][cid] = float(trainer.evaluate(self._test[cid]).accuracy or 0.0)
                trainer.set_global(reference)
                trainer.set_shared(held)
        return out

    def _combine_fomo(self, cid: str, index: int, ids: list[str], round_number: int) -> bool | None:
        """Weigh k peers' shared layers on ``cid``'s validation split; True when none helped (None: no peers)."""
        k = min(self.config.fomo_candidates or 0, len(ids) - 1)
        if k == 0:
            return None
        picked = select_candidates(self._affinity[cid], k=k, epsilon=exploration_rate(round_number),
                                   rng=self._rng(round_number, 2, index), exclude={index})
        candidates = [self._uploads[ids[j]] for j in picked]
        update = combine_candidates_fomo(self._trainers[cid], candidates, self._val[cid], round_number=round_number)
        self._affinity[cid] = update_affinity(self._affinity[cid], picked, update.weights)
        return update.kept_own

    def run(self, *, on_round: Callable[[RoundMetrics], None] | None = None) -> SimulationResult:
        """All rounds, then the optional fine-tuning; ``on_round`` (e.g. a progress bar) is called after each round."""
        start = time.perf_counter()
        records: list[RoundMetrics] = []
        ckpt = self._checkpoint
        if ckpt is not None and self._resume_after is not None:
            records = ckpt.records(self._resume_after)
            self.global_params, self._regional = ckpt.load_server(list(self._regional))
            logger.info("resumed from %s after round %d", ckpt.directory, self._resume_after)
        earlier = sum(r.seconds for r in records)
        joined: list[NewcomerResult] = []
        for r in range(len(records), self.config.rounds):
            record = self.run_round(r)
            records.append(record)
            if self._newcomers is not None and r + 1 in self._newcomers.config.join_rounds:
                joined += self._newcomers.evaluate(self.global_params, join_round=r + 1)
            logger.info("round %d: mean accuracy %.4f, %d aggregated, %d dropped", r, record.mean_accuracy,
                        len(record.aggregated), len(record.dropped))
            if ckpt is not None:
                ckpt.append_record(record)
                if ckpt.due(r, self.config.rounds - 1):
                    ckpt.save(r, self._trainers, self.global_params, self._regional)
            if on_round is not None:
                on_round(record)
        final = records[-1].personalised_accuracy if records else self._evaluate()
        tuned = self._fine_tune() if self.config.finetune_epochs > 0 else {}
        chosen = None
        if self.config.choice_epochs and self._local_bundle is not None:
            chosen = choose_against_local(self._trainers, self._local_bundle, train=self._train, val=self._val,
                                          test=self._test, rounds=self.config.rounds, budget=self.config.budget,
                                          max_epochs=self.config.choice_epochs, rng=self._rng, threads=self._threads)
        return SimulationResult(rounds=tuple(records), final_accuracy=final, global_params=dict(self.global_params),
                                fine_tuned_accuracy=tuned, test_examples=dict(self._test_examples),
                                seconds=earlier + time.perf_counter() - start, validation=self.validation,
                                cold_start=tuple(joined), candidate_accuracy=chosen.candidates if chosen else {},
                                chosen_accuracy=chosen.accuracy if chosen else {},
                                chosen_model=chosen.picked if chosen else {})
