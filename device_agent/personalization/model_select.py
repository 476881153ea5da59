"""Which of a device's candidate models it keeps: chosen on its own validation data, ties to a fallback.

Two uses, one rule:

- *fallback to local*: a device that also trains a model on its own data alone
  keeps a personalised model only when it scores strictly higher validation
  accuracy than that local model; every tie goes to the local model, so on the
  validation split the choice is never worse than training alone;
- *early stopping*: fine-tuning from the received model scores the model after
  each epoch (epoch 0: the model as received) and keeps the best epoch.

The rule (:func:`choose_model`): the highest validation accuracy wins (classification;
regression scores by loss alone); among equal accuracies the ``fallback``
candidate wins if it is one of them, otherwise the lowest loss, then the
candidate listed first. Pure logic; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ModelScore:
    """One candidate and what it scored on the validation split (``accuracy`` None for regression)."""

    name: str
    accuracy: float | None
    loss: float


@dataclass(frozen=True, kw_only=True)
class ModelChoice:
    """The candidate a device keeps (``name``), its scores, and every candidate's."""

    name: str
    accuracy: float | None
    loss: float
    scores: tuple[ModelScore, ...]


def choose_model(scores: Sequence[ModelScore], *, fallback: str | None = None) -> ModelChoice:
    """The candidate the module's rule picks from ``scores``; ValueError for none or an unknown ``fallback``."""
    if not scores:
        raise ValueError("no candidates to choose from")
    names = [s.name for s in scores]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names repeat: {names}")
    if fallback is not None and fallback not in names:
        raise ValueError(f"fallback {fallback!r} is not a candidate ({names})")
    regression = any(s.accuracy is None for s in scores)
    if regression:
        top = min(s.loss for s in scores)
        tied = [s for s in scores if s.loss == top]
    else:
        top = max(float(s.accuracy or 0.0) for s in scores)
        tied = [s for s in scores if s.accuracy == top]
    preferred = [s for s in tied if s.name == fallback]
    best = preferred[0] if preferred else min(tied, key=lambda s: (s.loss, names.index(s.name)))
    return ModelChoice(name=best.name, accuracy=best.accuracy, loss=best.loss, scores=tuple(scores))


def best_index(scores: Sequence[ModelScore]) -> int:
    """Position in ``scores`` of the candidate :func:`choose_model` picks without a fallback."""
    name = choose_model(scores).name
    return [s.name for s in scores].index(name)


def early_stop_epoch(scores: Sequence[ModelScore], *, patience: int) -> int | None:
    """Index of the best epoch so far (``scores[0]``: epoch 0), or None while training should go on.

    Training stops once ``patience`` epochs in a row have not beaten the best (by the rule of
    :func:`choose_model` with no fallback: higher accuracy, or equal accuracy and lower loss).
    """
    if patience < 1:
        raise ValueError("patience must be >= 1")
    best = best_index(scores)
    return best if len(scores) - 1 - best >= patience else None
