"""Compare federated algorithms on your own per-client arrays and model, in one call (``sdk.simulation.compare``).

:func:`compare` validates the arrays (the rules of
:mod:`sdk.datasets.user_folder`), runs each algorithm in the in-process
simulator (real ORT training per device, seeded, every algorithm from the
same initial weights) and returns a :class:`ResultsTable`: per-device and
mean test accuracy per algorithm, printable and writable as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdk.datasets.holdout import DEFAULT_VALIDATION_FRACTION
from sdk.training_defaults import DEFAULT_LEARNING_RATE, DEFAULT_OPTIMIZER

if TYPE_CHECKING:
    import torch

    from sdk.datasets.federated import FederatedDataset
    from sdk.model_spec import ParameterSplit


@dataclass(frozen=True, kw_only=True)
class AlgorithmResult:
    """One algorithm's outcome. Accuracies are in [0, 1], per device on its own test split, after the last round.

    ``global_mean``: the mean accuracy of the single global model (FedAvg,
    FedProx; None for algorithms without one). ``fomo_kept_own``: FedFomo's
    share of device-rounds in which no peer helped (None for others).
    ``round_means``: the mean accuracy after each round.
    """

    algorithm: str
    per_device: dict[str, float]
    mean: float
    global_mean: float | None
    fomo_kept_own: float | None
    round_means: tuple[float, ...]
    seconds: float


@dataclass(frozen=True, kw_only=True)
class ResultsTable:
    """Per-device and mean accuracy for each algorithm compared; ``str()`` is a text table, :meth:`to_json` JSON.

    ``settings`` records how the runs were made (rounds, epochs, learning
    rate...); ``data`` describes the dataset; ``validation`` says what was
    held out for validation ("" when the data had validation splits).
    """

    results: tuple[AlgorithmResult, ...]
    devices: tuple[str, ...]
    data: str
    validation: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, algorithm: str) -> AlgorithmResult:
        for result in self.results:
            if result.algorithm == algorithm:
                return result
        raise KeyError(f"{algorithm!r} was not compared; compared: {[r.algorithm for r in self.results]}")

    @property
    def best(self) -> str:
        """The algorithm with the highest mean per-device accuracy (the first one on a tie)."""
        return max(self.results, key=lambda r: r.mean).algorithm

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return {"settings": self.settings, "data": self.data, "validation": self.validation, "devices": list(self.devices),
                "results": [asdict(r) | {"round_means": list(r.round_means)} for r in self.results], "best": self.best}

    def to_json(self, path: str | Path | None = None) -> str:
        """The table as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def __str__(self) -> str:
        names = [r.algorithm for r in self.results]
        width = max([len("device"), *(len(d) for d in self.devices)])
        cols = [max(8, len(n)) for n in names]
        lines = [f"{'device':<{width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, cols))]
        for d in self.devices:
            lines.append(f"{d:<{width}}  " + "  ".join(f"{100 * r.per_device[d]:>{w}.2f}" for r, w in zip(self.results, cols)))
        lines.append(f"{'mean':<{width}}  " + "  ".join(f"{100 * r.mean:>{w}.2f}" for r, w in zip(self.results, cols)))
        if any(r.global_mean is not None for r in self.results):
            lines.append(f"{'global':<{width}}  " + "  ".join(
                f"{'—' if r.global_mean is None else f'{100 * r.global_mean:.2f}':>{w}}" for r, w in zip(self.results, cols)))
        notes = [f"test accuracy (%) per device after {self.settings.get('rounds')} rounds; best mean: {self.best}"]
        notes += [f"fedfomo kept only its own model in {100 * r.fomo_kept_own:.0f}% of device-rounds"
                  for r in self.results if r.fomo_kept_own is not None]
        if self.validation:
            notes.append(f"validation: {self.validation}")
        return "\n".join(lines + notes)


def compare(
    clients: Mapping[str, Mapping[str, Any]] | FederatedDataset,
    model_factory: Callable[[], torch.nn.Module],
    *,
    split: ParameterSplit | None = None,
    algorithms: Sequence[str] | None = None,
    rounds: int = 10,
    epochs: int = 1,
    personal_epochs: int | None = None,
    batch_size: int = 32,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    optimizer: str = DEFAULT_OPTIMIZER,
    mu: float | None = None,
    num_classes: int | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    fomo_candidates: int = 5,
    seed: int = 0,
    threads: int = 1,
) -> ResultsTable:
    """Run each of ``algorithms`` on ``clients`` with the model ``model_factory()`` builds; return the results table.

    ``clients`` maps a client id to its arrays, with the keys of a client's
    ``.npz`` file (``x_train``, ``y_train``, ``x_test``, ``y_test``, optional
    ``x_val``/``y_val``), or is a loaded :class:`FederatedDataset`.
    ``model_factory`` is called with no arguments (a class or a lambda).
    ``split`` names the model's shared and personal parameters by prefix
    (``ParameterSplit(shared=("base",), personal=("head",))``); None shares
    everything, which rules out algorithms that keep a personal head.
    ``algorithms`` None: local, fedavg and fedalt with a personal head, else
    local, fedavg and fedprox. ``mu`` None: each algorithm's default.
    Clients without a validation split get ``validation_fraction`` of their
    training examples held out (seeded). Bad arrays raise
    :class:`~sdk.datasets.errors.DatasetFormatError`; an unknown algorithm,
    one that needs a personal head without one, a split that does not fit the
    model, or a model that rejects the examples or does not return one score
    per class raises ValueError before anything runs.
    """
    from device_agent.trainer import TrainBudget
    from sdk.datasets.federated import FederatedDataset
    from sdk.datasets.user_folder import clients_from_arrays
    from sdk.simulation.algorithms import algorithm
    from sdk.simulation.runner import BundleTraining, ModelSource, run_algorithm
    from sdk.simulation.simulator import SimulationConfig

    data = clients if isinstance(clients, FederatedDataset) else clients_from_arrays(clients, num_classes=num_classes)
    personal = tuple(split.personal) if split is not None else ()
    shared = tuple(split.shared) if split is not None else ("*",)
    names = tuple(algorithms) if algorithms is not None else (
        ("local", "fedavg", "fedalt") if personal else ("local", "fedavg", "fedprox"))
    if not names:
        raise ValueError("algorithms: name at least one")
    source = ModelSource(factory=model_factory, personal=personal, shared=shared, name=getattr(model_factory, "__name__", "model"))
    for name in names:
        source.split_for(algorithm(name))  # unknown names and missing heads fail here, before any training
    for personal_head in {algorithm(name).personal_head for name in names}:
        source.check(data, algorithm(next(n for n in names if algorithm(n).personal_head == personal_head)))
    config = SimulationConfig(rounds=rounds, seed=seed, validation_fraction=validation_fraction,
                              budget=TrainBudget(epochs=epochs, batch_size=batch_size, personal_epochs=personal_epochs))
    training = BundleTraining(learning_rate=learning_rate, optimizer=optimizer, mu=mu)
    results = []
    validation = ""
    for name in names:
        run = run_algorithm(data, name, model=source, config=config, training=training, fomo_candidates=fomo_candidates,
                            threads=threads)
        r = run.result
        last = r.rounds[-1] if r.rounds else None
        has_global = last is not None and bool(last.global_accuracy) and not algorithm(name).personal_head
        validation = r.validation.describe() if r.validation is not None else ""
        results.append(AlgorithmResult(
            algorithm=name, per_device=dict(r.final_accuracy), mean=r.mean_final_accuracy,
            global_mean=(sum(last.global_accuracy.values()) / len(last.global_accuracy)) if has_global and last else None,
            fomo_kept_own=r.fomo_kept_own_overall, round_means=tuple(x.mean_accuracy for x in r.rounds), seconds=r.seconds,
        ))
    settings = {"rounds": rounds, "epochs": epochs, "personal_epochs": personal_epochs, "batch_size": batch_size,
                "learning_rate": learning_rate, "optimizer": optimizer, "mu": mu, "seed": seed,
                "validation_fraction": validation_fraction, "personal": list(personal), "shared": list(shared)}
    return ResultsTable(results=tuple(results), devices=tuple(c.client_id for c in data.clients), data=data.description,
                        validation=validation, settings=settings)
