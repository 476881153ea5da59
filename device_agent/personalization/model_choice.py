"""Which model a device uses: a mixture of its personal and the global model, chosen on its own validation data.

APFL (Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning",
arXiv:2003.13461, 2020) serves ``alpha * personal + (1 - alpha) * global`` and
learns ``alpha`` per device. fedge mixes the two models' *outputs* and
chooses ``alpha`` from a grid on the device's validation split:

- classification (cross-entropy): the mixture predicts
  ``alpha * softmax(personal) + (1 - alpha) * softmax(global)``; its outputs are
  the log of those probabilities (valid logits: same argmax, same softmax);
- binary labels (BCE with logits): the same with sigmoids, outputs as logits;
- regression (MSE): ``alpha * personal + (1 - alpha) * global``.

``alpha = 1`` is the personal model alone, ``alpha = 0`` the global model alone,
so the grid also *selects* between the two. Why outputs and not weights:
an output mixture is safe for any two models, whereas averaging weights
assumes both sit in one basin (Ditto's proximal term keeps them near, it does
not guarantee it). Why a grid chosen on validation rather than a learned
alpha: it needs no gradient through the mixture (the device's training
graphs stay as they are), costs two forward passes over the validation split,
and cannot diverge on a handful of examples.

The rule: the highest validation accuracy wins (classification; regression
has none); ties go to the lower validation loss (mean negative
log-likelihood of the mixture, or mean squared error), then to the larger
``alpha`` (the personal model, Ditto's default). Pure numpy; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from device_agent.bundle.manifest import LossKind

DEFAULT_ALPHAS: tuple[float, ...] = tuple(i / 10 for i in range(11))
"""The weights on the personal model that are tried: 0, 0.1, ..., 1."""

_TINY = np.float64(1e-12)


@dataclass(frozen=True, kw_only=True)
class CandidateScore:
    """One mixture weight and what it scored on the validation split (``accuracy`` None for regression)."""

    alpha: float
    accuracy: float | None
    loss: float


@dataclass(frozen=True, kw_only=True)
class MixtureChoice:
    """The weight a device chose for its personal model, and how every candidate scored.

    ``alpha``: weight of the personal model's outputs (1: personal only, 0: global only).
    ``accuracy``/``loss``: the chosen mixture's validation figures; ``examples``: validation size.
    """

    alpha: float
    accuracy: float | None
    loss: float
    examples: int
    candidates: tuple[CandidateScore, ...]

    @property
    def picked(self) -> str:
        """``"personal"`` (alpha 1), ``"global"`` (alpha 0) or ``"mixture"``."""
        if self.alpha >= 1.0:
            return "personal"
        return "global" if self.alpha <= 0.0 else "mixture"


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -np.asarray(z, dtype=np.float64))


def mix_outputs(personal: np.ndarray, global_: np.ndarray, alpha: float, kind: LossKind) -> np.ndarray:
    """The outputs of ``alpha * personal + (1 - alpha) * global`` in the models' own output space (float32; see module docs)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if personal.shape != global_.shape:
        raise ValueError(f"outputs differ in shape: {personal.shape} vs {global_.shape}")
    if kind is LossKind.MSE:
        return (alpha * np.asarray(personal, np.float64) + (1 - alpha) * np.asarray(global_, np.float64)).astype(np.float32)
    if kind is LossKind.CROSS_ENTROPY:
        terms = [(alpha, _log_softmax(personal)), (1 - alpha, _log_softmax(global_))]
        return _log_mix(terms).astype(np.float32)
    # BCE: mix P(y=1) and P(y=0) separately, return the log-odds
    pos = _log_mix([(alpha, _log_sigmoid(personal)), (1 - alpha, _log_sigmoid(global_))])
    neg = _log_mix([(alpha, _log_sigmoid(-np.asarray(personal))), (1 - alpha, _log_sigmoid(-np.asarray(global_)))])
    return (pos - neg).astype(np.float32)


def even_ensemble(outputs: Sequence[np.ndarray], kind: LossKind) -> np.ndarray:
    """The outputs of the even mixture of several models (each weight 1/k), in the models' own output space.

    ``mix_outputs`` folded over the list: the mean of the predicted probabilities (classification)
    or of the outputs (regression). ValueError for an empty list.
    """
    if not len(outputs):
        raise ValueError("an ensemble needs at least one model's outputs")
    mixed = np.asarray(outputs[0], dtype=np.float32)
    for k, out in enumerate(outputs[1:], start=2):
        mixed = mix_outputs(out, mixed, 1.0 / k, kind)
    return mixed


def _log_mix(terms: Sequence[tuple[float, np.ndarray]]) -> np.ndarray:
    """log(sum_i w_i * exp(log_p_i)) for weights w_i >= 0, stable; zero weights drop out."""
    kept = [np.log(w) + lp for w, lp in terms if w > 0]
    return kept[0] if len(kept) == 1 else np.logaddexp(kept[0], kept[1])


def output_loss(outputs: np.ndarray, y: np.ndarray, kind: LossKind) -> float:
    """Mean task loss of ``outputs``: cross-entropy of the logits, BCE with logits, or mean squared error."""
    if len(y) == 0:
        raise ValueError("no examples")
    if kind is LossKind.CROSS_ENTROPY:
        labels = np.asarray(y, dtype=np.int64)
        return float(-np.mean(_log_softmax(outputs)[np.arange(len(labels)), labels]))
    out = np.asarray(outputs, dtype=np.float64)
    target = np.asarray(y, dtype=np.float64).reshape(out.shape)
    if kind is LossKind.MSE:
        return float(np.mean((out - target) ** 2))
    return float(-np.mean(target * _log_sigmoid(out) + (1 - target) * _log_sigmoid(-out)))


def correct_count(outputs: np.ndarray, y: np.ndarray, kind: LossKind) -> int:
    """Correct predictions among ``outputs`` (classification; 0 for MSE).

    Cross-entropy: argmax equals the label. BCE: examples counted by matching
    elements divided by the elements per example (the trainer's rule).
    """
    if kind is LossKind.CROSS_ENTROPY:
        return int(np.sum(np.argmax(outputs, axis=-1) == y))
    if kind is LossKind.BCE_WITH_LOGITS:
        return int(np.sum((outputs > 0) == (y > 0.5))) // max(1, int(np.prod(np.shape(y)[1:])))
    return 0


def choose_mixture(personal: np.ndarray, global_: np.ndarray, y: np.ndarray, kind: LossKind, *,
                   alphas: Sequence[float] = DEFAULT_ALPHAS) -> MixtureChoice:
    """Score every weight in ``alphas`` on validation outputs ``personal``/``global_`` with labels ``y``; pick by the module's rule.

    ValueError when there are no validation examples or no candidate weights.
    """
    if not len(alphas):
        raise ValueError("alphas must name at least one weight")
    n = len(y)
    if n == 0:
        raise ValueError("no validation examples to choose on")
    scores = []
    for alpha in alphas:
        mixed = mix_outputs(personal, global_, float(alpha), kind)
        accuracy = None if kind is LossKind.MSE else correct_count(mixed, y, kind) / n
        scores.append(CandidateScore(alpha=float(alpha), accuracy=accuracy, loss=output_loss(mixed, y, kind)))
    best = max(scores, key=lambda s: (s.accuracy if s.accuracy is not None else 0.0, -s.loss, s.alpha))
    return MixtureChoice(alpha=best.alpha, accuracy=best.accuracy, loss=best.loss, examples=n, candidates=tuple(scores))
