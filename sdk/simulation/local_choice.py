"""After federation, each device keeps what its validation data says is best, falling back to training alone.

Per device, after the last round (evaluation only: the federated trajectory is unchanged):

1. it trains a *local* model from the bundle's initial weights on its own data, round by round with
   the fleet's budget and the same shuffles as the local-only baseline
   (``local_bundle``: the local-only run's bundle, so the model is that run's when every device
   takes part in every round);
2. from the model it holds (``served``: the global model, global trunk + own head, Ditto's chosen
   mixture) it fine-tunes with early stopping on validation, from fresh optimizer moments
   (:func:`~device_agent.local_round.fine_tune_early_stopped`): the head (bundles with a
   ``finetune`` set) and every parameter (bundles without a personal head or model);
3. ensembles (:func:`~device_agent.personalization.model_choice.even_ensemble`, the mean of the
   predicted probabilities): the local model with each other candidate (``local+served``,
   ``local+FT(head)``, ``local+FT(all)``) and, with two fine-tuned scopes, with both
   (``local+FT(head)+FT(all)``);
4. it keeps the candidate with the best validation accuracy, every tie going to the local model
   (:func:`~device_agent.personalization.model_select.choose_model`; rule ``TIES_TO_LOCAL``). For
   comparison the same scores are also read with accuracy ties broken by the lower validation loss,
   the local model not preferred (rule ``TIES_BY_LOSS``).

Every step is the device's own code; only the loop over devices lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from device_agent.bundle.archive import TrainingBundle
from device_agent.data import DataSource
from device_agent.local_round import fine_tune_early_stopped, train_local_round
from device_agent.personalization.model_choice import correct_count, even_ensemble, output_loss
from device_agent.personalization.model_select import ModelScore, choose_model
from device_agent.trainer import DeviceTrainer, TrainBudget

LOCAL = "local"
SERVED = "served"
TIES_TO_LOCAL = "ties to local"
TIES_BY_LOSS = "ties by loss"
_PATIENCE = 3

Outputs = tuple[np.ndarray, np.ndarray]  # (outputs, labels)


@dataclass(frozen=True, kw_only=True)
class LocalChoice:
    """Per device test accuracy: of each candidate but the two plain ones (``candidates[name]``: ``FT(head)``,
    ``FT(all)``, ``local+served``, ``local+FT(head)``...) and, per rule, of the kept model (``accuracy``) and its name (``picked``)."""

    candidates: dict[str, dict[str, float]]
    accuracy: dict[str, dict[str, float]]
    picked: dict[str, dict[str, str]]


def choose_against_local(
    trainers: Mapping[str, DeviceTrainer],
    local_bundle: TrainingBundle,
    *,
    train: Mapping[str, DataSource],
    val: Mapping[str, DataSource],
    test: Mapping[str, DataSource],
    rounds: int,
    budget: TrainBudget,
    max_epochs: int,
    rng: Callable[..., np.random.Generator],
    threads: int = 1,
) -> LocalChoice:
    """Steps 1-4 of the module docs for every device; ``rng(*keys)`` is the simulator's seeded generator.

    The local model uses ``rng(r, 1, index)`` in round ``r`` (the local-only run's shuffles), fine-tuning
    ``rng(rounds, 4, index, k)``. Devices without validation data keep the local model.
    """
    candidates: dict[str, dict[str, float]] = {}
    accuracy: dict[str, dict[str, float]] = {TIES_TO_LOCAL: {}, TIES_BY_LOSS: {}}
    picked: dict[str, dict[str, str]] = {TIES_TO_LOCAL: {}, TIES_BY_LOSS: {}}
    for index, (cid, trainer) in enumerate(trainers.items()):
        kind = trainer.manifest.hyperparameters.loss
        local = DeviceTrainer(local_bundle, threads=threads)
        for r in range(rounds):
            train_local_round(local, train[cid], global_params=None, round_number=r, budget=budget, rng=rng(r, 1, index))
        has_val = len(val[cid]) > 0
        outputs: dict[str, tuple[Outputs | None, Outputs]] = {
            name: (t.model_outputs(val[cid]) if has_val else None, t.model_outputs(test[cid]))
            for name, t in ((LOCAL, local), (SERVED, trainer))}
        for k, scope in enumerate(_scopes(trainer) if has_val else []):
            held = {**trainer.get_shared(), **trainer.get_personal()}
            fine_tune_early_stopped(trainer, train[cid], val[cid], scope=scope, max_epochs=max_epochs, patience=_PATIENCE,
                                    batch_size=budget.batch_size, learning_rate=budget.learning_rate,
                                    rng=rng(rounds, 4, index, k))
            outputs[f"FT({scope})"] = (trainer.model_outputs(val[cid]), trainer.model_outputs(test[cid]))
            trainer.set_shared({n: held[n] for n in trainer.manifest.shared_names})
            if trainer.manifest.personal_names:
                trainer.set_personal({n: held[n] for n in trainer.manifest.personal_names})
        tuned = [n for n in outputs if n.startswith("FT(")]
        members = [[n] for n in outputs if n != LOCAL] + ([tuned] if len(tuned) > 1 else [])
        for names in members:
            outputs[_ensemble_name(names)] = tuple(  # type: ignore[assignment]
                None if any(outputs[n][i] is None for n in (LOCAL, *names)) else
                (even_ensemble([outputs[n][i][0] for n in (LOCAL, *names)], kind), outputs[LOCAL][i][1])  # type: ignore[index]
                for i in (0, 1))
        test_acc = {name: _accuracy(pair[1], kind) for name, pair in outputs.items()}
        for name, acc in test_acc.items():
            if name not in (LOCAL, SERVED):
                candidates.setdefault(name, {})[cid] = acc
        scores = [_score(name, pair[0], kind) for name, pair in outputs.items() if pair[0] is not None]
        for rule, fallback in ((TIES_TO_LOCAL, LOCAL), (TIES_BY_LOSS, None)):
            name = choose_model(scores, fallback=fallback).name if scores else LOCAL
            accuracy[rule][cid], picked[rule][cid] = test_acc[name], name
    return LocalChoice(candidates=candidates, accuracy=accuracy, picked=picked)


def _ensemble_name(names: list[str]) -> str:
    """The even ensemble of the local model with candidates ``names``: ``local+served``, ``local+FT(head)+FT(all)``..."""
    return "+".join((LOCAL, *names))


def _scopes(trainer: DeviceTrainer) -> list[str]:
    """What a device can fine-tune: its ``finetune`` set, and every parameter when it has no personal head or model."""
    scopes = ["head"] if trainer.can_fine_tune else []
    if not trainer.manifest.personal_names and not trainer.has_personal_model:
        scopes.append("all")
    return scopes


def _accuracy(pair: Outputs, kind) -> float:  # type: ignore[no-untyped-def]
    out, y = pair
    return correct_count(out, y, kind) / max(1, len(y))


def _score(name: str, pair: Outputs, kind) -> ModelScore:  # type: ignore[no-untyped-def]
    out, y = pair
    return ModelScore(name=name, accuracy=correct_count(out, y, kind) / len(y), loss=output_loss(out, y, kind))
