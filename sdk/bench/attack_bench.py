"""Influence attacks on the default aggregation: how far colluding devices move the global model, and what it costs.

The federation is real except for the transport: 20 devices of scikit-learn's
digits (Dirichlet(0.5) label skew) train an MLP with ONNX Runtime
(:class:`~device_agent.trainer.DeviceTrainer`, the on-device trainer), seal
their deltas with their own Ed25519 keys to the region's X25519 key, and a
:class:`~sdk.aggregator.RegionalAggregator` and a
:class:`~sdk.aggregator.RootAggregator`, each on its own SQLite store, run
the whole intake (authentication, validation, bounds, durable fold) and the
close. ``colluders`` of the devices attack in every round. Each trains
honestly to get its own delta ``d``, then sends instead:

- ``norm``: ``-d`` rescaled to L2 norm 4.6e4 (the field test's update), its true sample count;
- ``samples``: ``-d`` with ``sample_count`` 10^12;
- ``both``: ``-d`` at norm 4.6e4 with ``sample_count`` 10^12.

Per round, the **honest step** is the sample-weighted mean of the honest
devices' own deltas from the same global model (plain numpy, no bounds):
what the federation would do without the attackers. ``excess`` is
``||G_{r+1} - G_r - honest step||``, reported relative to the honest step's
norm (mean and worst round). After the last round: the final global model's
accuracy on the test splits of devices that never attack (pooled), and the
honest devices' mean training loss in the last round.

Configurations: ``default`` (:class:`~sdk.aggregation.influence.InfluencePolicy()`,
the streaming mean), ``median`` (the same bounds, the coordinate-wise median:
the option for a larger share of colluders, at O(devices x model) memory) and
``unsafe`` (``norm="unbounded"``, weights capped only at the policy's maximum
2**32 - 1), the old behaviour, for contrast.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdk.aggregation import AggregationConfig
from sdk.aggregation.influence import MAX_SAMPLE_COUNT, InfluencePolicy

ATTACKS = ("none", "norm", "samples", "both")
COLLUDERS = (1, 2, 5)
CONFIGS: dict[str, tuple[InfluencePolicy, AggregationConfig]] = {
    "default": (InfluencePolicy(), AggregationConfig()),
    "median": (InfluencePolicy(), AggregationConfig(rule="median")),
    "unsafe": (InfluencePolicy(norm="unbounded", weight="fixed", max_sample_count=MAX_SAMPLE_COUNT), AggregationConfig()),
}
HUGE_NORM = 4.6e4
HUGE_COUNT = 10**12
FLEET = "attack"
REGION = "eu"
CLIENTS = 20
EVALUATED_FROM = max(COLLUDERS)
"""Accuracy is measured on devices ``EVALUATED_FROM..`` (never attackers in any run), so every run is comparable."""


@dataclass(frozen=True, kw_only=True)
class AttackRun:
    """One (configuration, attack, colluders) run: excess over the honest step (relative: mean, worst round),
    the honest step's mean norm, final accuracy of the never-attacking devices, last-round honest training loss,
    how many honest trainings failed (non-finite loss) and how many malicious updates the region refused."""

    config: str
    attack: str
    colluders: int
    excess_mean: float
    excess_max: float
    honest_step_norm: float
    accuracy: float
    honest_loss: float
    honest_failures: int
    refused: int
    seconds: float


def _digits(seed: int):  # -> FederatedDataset
    from sdk.datasets.digits import load_digits

    return load_digits(num_clients=CLIENTS, label_skew=0.5, seed=seed)


def _bundle(data, workdir: Path, seed: int, learning_rate: float):  # -> TrainingBundle
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent.bundle.archive import install_bundle
    from device_agent.bundle.manifest import OptimizerKind, TrainingMode
    from sdk.artifacts import TrainingSpec
    from sdk.bundle_builder import build_bundle
    from sdk.simulation.catalog import build_model

    torch.manual_seed(seed)
    model, split, _ = build_model("mlp", data, personal=False, hidden=(32,))
    key = Ed25519PrivateKey.generate()
    build_bundle(model, example_input=torch.zeros((2, *data.input_shape)), split=split,
                 spec=TrainingSpec(mode=TrainingMode.FEDAVG, optimizer=OptimizerKind.SGD, learning_rate=learning_rate),
                 signing_key=key, out_path=workdir / "b.fedge", model_name="attack-digits")
    return install_bundle(workdir / "b.fedge", key.public_key(), workdir / "bundle")


def _norm(params: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(v, dtype=np.float64) ** 2)) for v in params.values()))


def _malicious(attack: str, delta: Mapping[str, np.ndarray], samples: int) -> tuple[dict[str, np.ndarray], int]:
    """What an attacker sends instead of its own ``delta`` (``samples`` examples)."""
    flipped = {name: -np.asarray(value, dtype=np.float64) for name, value in delta.items()}
    scale = HUGE_NORM / max(_norm(flipped), 1e-12) if attack in ("norm", "both") else 1.0
    count = HUGE_COUNT if attack in ("samples", "both") else samples
    return {name: (value * scale).astype(np.float32) for name, value in flipped.items()}, count


class _Federation:
    """One run's devices (trainers, keys, data) and aggregators (real stores under ``workdir``)."""

    def __init__(self, bundle, data, policy: InfluencePolicy, aggregation: AggregationConfig, workdir: Path, *, epochs: int,
                 batch_size: int) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        from device_agent.data import ArrayDataSource
        from device_agent.trainer import DeviceTrainer, TrainBudget
        from sdk.aggregator import RegionalAggregator, RegionalConfig, RootAggregator, RootConfig, RoundPolicy

        self.ids = [c.client_id for c in data.clients]
        self.trainers = {c.client_id: DeviceTrainer(bundle, threads=1) for c in data.clients}
        self.train = {c.client_id: ArrayDataSource(c.train.x, c.train.y) for c in data.clients}
        self.test = {c.client_id: ArrayDataSource(c.test.x, c.test.y) for c in data.clients}
        self.keys = {cid: Ed25519PrivateKey.generate() for cid in self.ids}
        self.budget = TrainBudget(epochs=epochs, batch_size=batch_size)
        spec = bundle.manifest.shared_spec()
        self.version = bundle.manifest.bundle_version
        self.region_enc, self.root_enc = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        region_sign, root_sign = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        self.region = RegionalAggregator.open(workdir / "region.sqlite", RegionalConfig(
            fleet=FLEET, region=REGION, encryption_key=self.region_enc, signing_key=region_sign, spec=spec,
            bundle_version=self.version, policy=RoundPolicy(quorum=len(self.ids), deadline_s=3600.0),
            device_keys={cid: key.public_key() for cid, key in self.keys.items()}, influence=policy, aggregation=aggregation,
            root_verify_key=root_sign.public_key(), root_encryption_key=self.root_enc.public_key()))
        self.root = RootAggregator.open(workdir / "root.sqlite", RootConfig(
            fleet=FLEET, encryption_key=self.root_enc, signing_key=root_sign, spec=spec, bundle_version=self.version,
            policy=RoundPolicy(quorum=1, deadline_s=3600.0, min_updates=0), region_keys={REGION: region_sign.public_key()}))
        self.root_verify = root_sign.public_key()
        self.model_blob = self.root.start_round(0, self.trainers[self.ids[0]].get_shared())

    def close(self) -> None:
        self.region.close()
        self.root.close()

    def play_round(self, r: int, attackers: set[str], attack: str, rng: np.random.Generator) -> dict[str, Any]:
        """Train, seal, aggregate one round; the step taken, the honest step and the honest devices' figures."""
        from device_agent.errors import TrainingError
        from device_agent.local_round import train_local_round
        from device_agent.protocol.envelope import open_model, seal_update
        from device_agent.protocol.headers import UpdateHeader

        global_params = open_model(self.model_blob, trusted_signers=self.root_verify).tensors
        self.region.handle_root_model(self.model_blob)
        honest: list[tuple[int, dict[str, np.ndarray]]] = []
        losses, failures, refused = [], 0, 0
        for cid in self.ids:
            try:
                update = train_local_round(self.trainers[cid], self.train[cid], global_params=global_params, round_number=r,
                                           budget=self.budget, rng=rng)
            except TrainingError:
                failures += cid not in attackers
                continue
            delta, count = update.delta, update.num_examples
            if cid in attackers and attack != "none":
                delta, count = _malicious(attack, delta, count)
            else:
                honest.append((count, delta))
                losses.append(update.report.mean_loss)
            header = UpdateHeader.create(fleet=FLEET, sender=cid, region=REGION, round=r, bundle_version=self.version,
                                         sample_count=count)
            handled = self.region.handle_update(seal_update(header, delta, recipient_public_key=self.region_enc.public_key(),
                                                            sender_key=self.keys[cid]), topic_device=cid)
            refused += not handled.accepted
        aggregate = self.region.close_round()
        if aggregate.blob is not None:
            answer = self.root.handle_aggregate(aggregate.blob, topic_region=REGION)
            if answer.receipt is not None:
                self.region.handle_root_receipt(answer.receipt)
        self.model_blob = self.root.close_round()
        new = open_model(self.model_blob, trusted_signers=self.root_verify).tensors
        total = sum(n for n, _ in honest) or 1
        honest_step: dict[str, np.ndarray] = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_params.items()}
        for n, d in honest:
            for k in honest_step:
                honest_step[k] += n * d[k].astype(np.float64) / total
        step = {k: new[k].astype(np.float64) - global_params[k].astype(np.float64) for k in global_params}
        excess = _norm({k: step[k] - honest_step[k] for k in step})
        return {"excess": excess, "honest_norm": _norm(honest_step), "loss": float(np.mean(losses)) if losses else math.nan,
                "failures": failures, "refused": refused, "model": new}

    def accuracy(self, params: Mapping[str, np.ndarray]) -> float:
        """Pooled test accuracy of ``params`` over the devices that never attack (0.0 if the model cannot evaluate)."""
        correct = examples = 0.0
        for cid in self.ids[EVALUATED_FROM:]:
            trainer = self.trainers[cid]
            try:
                trainer.set_shared(dict(params))
                report = trainer.evaluate(self.test[cid])
            except Exception:  # noqa: BLE001 - a destroyed model may not even evaluate: that is 0 accuracy
                return 0.0
            correct += float(report.accuracy or 0.0) * report.examples
            examples += report.examples
        return correct / examples if examples else 0.0


def run_attack(config: str, attack: str, colluders: int, *, rounds: int, seed: int = 0, epochs: int = 3,
               batch_size: int = 16, learning_rate: float = 0.1, data=None) -> AttackRun:
    """One run of ``rounds`` rounds with ``colluders`` attackers (the first devices) doing ``attack`` every round."""
    if config not in CONFIGS or attack not in ATTACKS or not 0 <= colluders <= EVALUATED_FROM:
        raise ValueError(f"unknown run {config}/{attack}/{colluders}")
    started = time.perf_counter()
    data = data if data is not None else _digits(seed)
    with tempfile.TemporaryDirectory(prefix="fedge-attack-") as tmp:
        bundle = _bundle(data, Path(tmp), seed, learning_rate)
        policy, aggregation = CONFIGS[config]
        federation = _Federation(bundle, data, policy, aggregation, Path(tmp), epochs=epochs, batch_size=batch_size)
        try:
            attackers = set(federation.ids[:colluders]) if attack != "none" else set()
            rng = np.random.default_rng(seed)
            played = [federation.play_round(r, attackers, attack, rng) for r in range(rounds)]
            accuracy = federation.accuracy(played[-1]["model"])
        finally:
            federation.close()
    relative = [p["excess"] / p["honest_norm"] if p["honest_norm"] > 0 else math.inf for p in played]
    return AttackRun(config=config, attack=attack, colluders=colluders if attack != "none" else 0,
                     excess_mean=float(np.mean(relative)), excess_max=float(np.max(relative)),
                     honest_step_norm=float(np.mean([p["honest_norm"] for p in played])), accuracy=accuracy,
                     honest_loss=played[-1]["loss"], honest_failures=sum(p["failures"] for p in played),
                     refused=sum(p["refused"] for p in played), seconds=time.perf_counter() - started)


def run_attack_bench(*, rounds: int = 15, seed: int = 0, configs: tuple[str, ...] = tuple(CONFIGS),
                     attacks: tuple[str, ...] = ATTACKS[1:], colluders: tuple[int, ...] = COLLUDERS,
                     progress: Callable[[int], object] | None = None) -> list[AttackRun]:
    """A no-attack run and every (attack, colluders) run, for each configuration."""
    data = _digits(seed)
    runs = []
    for config in configs:
        for attack, k in [("none", 0), *((a, k) for a in attacks for k in colluders)]:
            runs.append(run_attack(config, attack, k, rounds=rounds, seed=seed, data=data))
            if progress is not None:
                progress(1)
    return runs


def format_table(runs: list[AttackRun], *, rounds: int) -> str:
    """One line per run: excess over the honest step (x its norm), final accuracy, last honest loss."""
    head = (f"{'config':8s} {'attack':8s} {'colluders':>9s} {'excess mean':>12s} {'excess max':>11s} "
            f"{'accuracy':>9s} {'honest loss':>12s} {'refused':>8s}")
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(f"{r.config:8s} {r.attack:8s} {r.colluders:>6d}/{CLIENTS} {r.excess_mean:12.3g} {r.excess_max:11.3g} "
                     f"{r.accuracy:9.4f} {r.honest_loss:12.4g} {r.refused:8d}")
    lines.append(f"excess = ||global step - honest step|| / ||honest step||, per round (mean, worst) over {rounds} rounds; "
                 f"accuracy of the final global model on devices {EVALUATED_FROM}..{CLIENTS - 1} (never attackers)")
    return "\n".join(lines)


def write_json(runs: list[AttackRun], path: Path, *, rounds: int, seed: int) -> None:
    """Write the runs plus the setting and machine info as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "attack", "rounds": rounds, "seed": seed, "clients": CLIENTS, "huge_norm": HUGE_NORM,
           "huge_count": HUGE_COUNT,
           "configs": {name: {"influence": asdict(p), "aggregation": asdict(a)} for name, (p, a) in CONFIGS.items()},
           "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
           "runs": [asdict(r) for r in runs]}
    path.write_text(json.dumps(doc, indent=2))
