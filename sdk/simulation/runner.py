"""One algorithm on one dataset: build the signed bundle for it, simulate, return the result.

What ``fedge simulate``, ``fedge bench accuracy``, ``fedge bench sweep`` and
:func:`sdk.simulation.compare` all do per algorithm, in one place: the model
comes from a :class:`ModelSource` (a factory plus which parameters stay
personal), the algorithm's row of :data:`~sdk.simulation.algorithms.ALGORITHMS`
says how the bundle trains and how the simulator treats it, and the torch
seed is set before the model is built, so every algorithm of one comparison
starts from the same initial weights.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sdk.simulation.algorithms import AlgorithmSpec, algorithm
from sdk.simulation.checkpoint import SimulationCheckpoint
from sdk.simulation.simulator import FederatedSimulator, SimulationConfig
from sdk.training_defaults import DEFAULT_LEARNING_RATE, DEFAULT_OPTIMIZER

if TYPE_CHECKING:
    import torch

    from sdk.datasets.federated import ClientData, FederatedDataset
    from sdk.model_spec import ParameterSplit
    from sdk.simulation.results import RoundMetrics, SimulationResult


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """How to make the model and which of its parameters stay on the device.

    ``factory`` builds a fresh ``torch.nn.Module`` on each call. ``personal``:
    name prefixes of the personal head (e.g. ``("head",)``); empty means the
    model has none, and algorithms that keep a personal head are refused.
    ``shared``: prefixes of the federated layers (``("*",)``: everything not
    personal). Algorithms without a personal head federate every parameter
    and offer the ``personal`` layers for local fine-tuning instead.
    """

    factory: Callable[[], torch.nn.Module] = field(repr=False)
    personal: tuple[str, ...] = ()
    shared: tuple[str, ...] = ("*",)
    name: str = "model"

    def __post_init__(self) -> None:
        for name in ("personal", "shared"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"{name} must be a sequence of name prefixes, not a string")
            object.__setattr__(self, name, tuple(value))

    def split_for(self, spec: AlgorithmSpec) -> tuple[ParameterSplit, tuple[str, ...]]:
        """The bundle's shared/personal split for ``spec`` and the prefixes offered for fine-tuning."""
        from sdk.model_spec import ParameterSplit

        if spec.personal_head:
            if not self.personal:
                raise ValueError(f"{spec.name} keeps a personal head on each device: say which parameters are personal"
                                 " (e.g. personal prefix 'head')")
            return ParameterSplit(shared=self.shared, personal=self.personal), ()
        return ParameterSplit(shared=("*",)), self.personal

    def check(self, data: FederatedDataset, spec: AlgorithmSpec) -> None:
        """Build the model once and check it fits ``spec`` and ``data``, before any training.

        ValueError with one line: the split names no parameter or leaves one
        out, the model rejects ``data``'s example shape, or it does not return
        one score per class. The ``split`` part of the message starts with
        ``split:``, the rest with ``model:``.
        """
        import torch

        from sdk.model_spec import ParameterSplitError

        split, _ = self.split_for(spec)
        net = self.factory()
        try:
            split.assign([n for n, _ in net.named_parameters()])
        except ParameterSplitError as exc:
            raise ValueError(f"split: {exc}") from exc
        shape = tuple(data.input_shape)
        try:
            with torch.no_grad():
                out = net(torch.zeros((2, *shape)))
        except Exception as exc:  # the user's forward(): any error means this shape does not fit
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(f"model: {self.name} rejects examples of shape {shape}: {type(exc).__name__}: {reason}") from exc
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, data.num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model: {self.name} returns {got} for 2 examples; expected (2, {data.num_classes}),"
                             f" one score per class")


@dataclass(frozen=True, kw_only=True)
class BundleTraining:
    """What the bundle carries: optimizer, learning rate, FedProx ``mu`` and Ditto's ``ditto_lambda`` (None: the algorithm's default)."""

    learning_rate: float = DEFAULT_LEARNING_RATE
    optimizer: str = DEFAULT_OPTIMIZER
    mu: float | None = None
    ditto_lambda: float | None = None


@dataclass(frozen=True, kw_only=True)
class AlgorithmRun:
    """A finished run: the simulator's result, the algorithm, the mu (and Ditto's lambda) used and the model's size."""

    algorithm: str
    result: SimulationResult
    mu: float
    parameters: int
    personal_parameters: int
    ditto_lambda: float = 0.0


def run_algorithm(
    data: FederatedDataset,
    name: str,
    *,
    model: ModelSource,
    config: SimulationConfig,
    training: BundleTraining = BundleTraining(),
    fomo_candidates: int = 5,
    threads: int = 1,
    on_round: Callable[[RoundMetrics], None] | None = None,
    checkpoint: SimulationCheckpoint | None = None,
    newcomers: Sequence[ClientData] = (),
) -> AlgorithmRun:
    """Simulate algorithm ``name`` on ``data``.

    ``config`` gives rounds, budget, participation, aggregation, hierarchy,
    seed...; the algorithm decides ``federated``, ``straggler_policy`` and
    ``fomo_candidates`` (``fomo_candidates`` here is the FedFomo peer count).
    ``finetune_epochs`` adds FedAvg+FT rows for algorithms without a personal head;
    ``choice_epochs`` the per-device choice against a local-only model (:mod:`sdk.simulation.local_choice`).
    ``checkpoint``: keep the bundle, each round's metrics and the fleet there,
    and resume from it (see :mod:`sdk.simulation.checkpoint`). ``newcomers``:
    the clients that join per ``config.cold_start``; the bundle then carries a
    ``finetune`` set over the model's personal prefixes (the head they train).
    """
    import torch
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from device_agent.bundle.archive import install_bundle
    from device_agent.bundle.manifest import OptimizerKind, TrainingMode
    from sdk.artifacts import TrainingSpec
    from sdk.bundle_builder import build_bundle
    from sdk.model_spec import ParameterSplit, matches_prefix

    spec = algorithm(name)
    split, finetune = model.split_for(spec)
    finetune = finetune if config.finetune_epochs else ()
    if config.cold_start is not None:
        if not model.personal:
            raise ValueError("cold start trains a newcomer's head: say which parameters are the head (personal prefixes)")
        finetune = model.personal
    config = replace(config, federated=spec.federated, straggler_policy=spec.straggler_policy,  # type: ignore[arg-type]
                     fomo_candidates=fomo_candidates if spec.fomo else None)
    mu = spec.default_mu if training.mu is None else training.mu
    lam = spec.default_ditto_lambda if training.ditto_lambda is None or spec.mode is not TrainingMode.DITTO else training.ditto_lambda
    torch.manual_seed(config.seed)  # before the model exists: the initial weights follow the seed
    net = model.factory()
    n_params = sum(p.numel() for p in net.parameters())
    n_personal = sum(p.numel() for n, p in net.named_parameters() if any(matches_prefix(n, q) for q in model.personal))
    with tempfile.TemporaryDirectory(prefix="fedge-sim-") as tmp:
        path = Path(tmp) / "b.fedge" if checkpoint is None else checkpoint.bundle_path
        if checkpoint is not None and path.exists():  # a resumed run trains the very bundle its saved state belongs to
            public = Ed25519PublicKey.from_public_bytes(checkpoint.public_key_path.read_bytes())
        else:
            key = Ed25519PrivateKey.generate()
            build_bundle(net, example_input=torch.zeros((2, *data.input_shape)), split=split,
                         spec=TrainingSpec(mode=spec.mode, mu=mu, optimizer=OptimizerKind(training.optimizer),
                                           learning_rate=training.learning_rate, finetune=finetune, ditto_lambda=lam),
                         signing_key=key, out_path=path, model_name=model.name)
            public = key.public_key()
            if checkpoint is not None:
                checkpoint.public_key_path.write_bytes(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        bundle = install_bundle(path, public, Path(tmp) / "bundle")
        local_bundle = None
        if config.choice_epochs:  # the local-only run's bundle: same seed, same initial weights, plain FedAvg training
            torch.manual_seed(config.seed)
            local_key = Ed25519PrivateKey.generate()
            build_bundle(model.factory(), example_input=torch.zeros((2, *data.input_shape)), split=ParameterSplit(shared=("*",)),
                         spec=TrainingSpec(mode=TrainingMode.FEDAVG, mu=0.0, optimizer=OptimizerKind(training.optimizer),
                                           learning_rate=training.learning_rate),
                         signing_key=local_key, out_path=Path(tmp) / "local.fedge", model_name=model.name)
            local_bundle = install_bundle(Path(tmp) / "local.fedge", local_key.public_key(), Path(tmp) / "local")
        result = FederatedSimulator(bundle, data, config, threads=threads, checkpoint=checkpoint,
                                    newcomers=newcomers, local_bundle=local_bundle).run(on_round=on_round)
    return AlgorithmRun(algorithm=name, result=result, mu=mu, parameters=n_params, personal_parameters=n_personal,
                        ditto_lambda=lam)
