"""The per-device choice of a personal/global output mixture: known answers, written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from device_agent.bundle.manifest import LossKind
from device_agent.personalization.model_choice import choose_mixture, correct_count, even_ensemble, mix_outputs, output_loss

CE = LossKind.CROSS_ENTROPY


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_mix_outputs_cross_entropy_is_the_log_of_the_mixed_probabilities() -> None:
    personal = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]], dtype=np.float32)
    global_ = np.array([[0.0, 1.0, 0.0], [1.0, -2.0, 0.5]], dtype=np.float32)
    mixed = mix_outputs(personal, global_, 0.25, CE)
    want = np.log(0.25 * _softmax(personal.astype(np.float64)) + 0.75 * _softmax(global_.astype(np.float64)))
    np.testing.assert_allclose(mixed, want, rtol=1e-6)
    # the endpoints are each model alone (as log-probabilities: same argmax, same softmax)
    np.testing.assert_allclose(_softmax(mix_outputs(personal, global_, 1.0, CE)), _softmax(personal), rtol=1e-6)
    np.testing.assert_allclose(_softmax(mix_outputs(personal, global_, 0.0, CE)), _softmax(global_), rtol=1e-6)


def test_mix_outputs_regression_and_binary() -> None:
    p, g = np.array([[1.0, -3.0]], np.float32), np.array([[3.0, 1.0]], np.float32)
    np.testing.assert_allclose(mix_outputs(p, g, 0.5, LossKind.MSE), [[2.0, -1.0]])
    mixed = mix_outputs(p, g, 0.5, LossKind.BCE_WITH_LOGITS)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    prob = 0.5 * sig(p.astype(np.float64)) + 0.5 * sig(g.astype(np.float64))
    np.testing.assert_allclose(mixed, np.log(prob / (1 - prob)), rtol=1e-5)
    with pytest.raises(ValueError):
        mix_outputs(p, g, 1.5, LossKind.MSE)
    with pytest.raises(ValueError):
        mix_outputs(p, g[:, :1], 0.5, LossKind.MSE)


def test_output_loss_and_correct_count_known_answers() -> None:
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    y = np.array([0, 1])
    assert output_loss(logits, y, CE) == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 2)
    assert correct_count(logits, y, CE) == 1
    assert output_loss(np.array([[1.0], [3.0]]), np.array([2.0, 2.0]), LossKind.MSE) == pytest.approx(1.0)
    assert correct_count(np.array([[1.0, -1.0], [-1.0, -1.0]]), np.array([[1.0, 0.0], [1.0, 0.0]]), LossKind.BCE_WITH_LOGITS) == 1


def test_choose_mixture_picks_the_best_validation_accuracy() -> None:
    # two examples of class 0 and 1; the personal model gets example 0 right, the global one example 1;
    # only a mixture gets both: personal is very sure on example 0, global is very sure on example 1.
    personal = np.array([[4.0, 0.0], [0.3, 0.0]])
    global_ = np.array([[0.0, 0.3], [0.0, 4.0]])
    y = np.array([0, 1])
    choice = choose_mixture(personal, global_, y, CE, alphas=(0.0, 0.5, 1.0))
    assert choice.alpha == 0.5 and choice.picked == "mixture" and choice.accuracy == 1.0 and choice.examples == 2
    assert [c.accuracy for c in choice.candidates] == [0.5, 1.0, 0.5]


def test_choose_mixture_breaks_ties_by_loss_then_towards_the_personal_model() -> None:
    y = np.array([0])
    sure, unsure = np.array([[3.0, 0.0]]), np.array([[0.5, 0.0]])
    # every weight is right; the most confident mixture (all personal) has the lowest loss
    assert choose_mixture(sure, unsure, y, CE, alphas=(0.0, 0.5, 1.0)).alpha == 1.0
    # global more confident: all global wins on loss
    assert choose_mixture(unsure, sure, y, CE, alphas=(0.0, 0.5, 1.0)).picked == "global"
    # identical models: a full tie, resolved towards the personal model (Ditto's default)
    same = choose_mixture(sure, sure, y, CE, alphas=(0.0, 0.3, 1.0))
    assert same.alpha == 1.0 and same.picked == "personal"


def test_choose_mixture_regression_uses_the_loss() -> None:
    y = np.array([1.0, 2.0])
    choice = choose_mixture(np.array([[0.0], [0.0]]), np.array([[2.0], [4.0]]), y, LossKind.MSE, alphas=(0.0, 0.5, 1.0))
    assert choice.alpha == 0.5 and choice.accuracy is None and choice.loss == pytest.approx(0.0)


def test_choose_mixture_refuses_no_examples_or_no_weights() -> None:
    with pytest.raises(ValueError, match="no validation"):
        choose_mixture(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0, dtype=np.int64), CE)
    with pytest.raises(ValueError, match="alphas"):
        choose_mixture(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros(1, dtype=np.int64), CE, alphas=())


def test_even_ensemble_averages_the_probabilities_of_every_model() -> None:
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(5, 4)).astype(np.float32) for _ in range(3)]
    probs = [np.exp(z) / np.exp(z).sum(axis=1, keepdims=True) for z in logits]
    mixed = even_ensemble(logits, LossKind.CROSS_ENTROPY)
    np.testing.assert_allclose(np.exp(mixed), np.mean(probs, axis=0), rtol=1e-5)
    assert even_ensemble(logits[:2], LossKind.CROSS_ENTROPY) == pytest.approx(mix_outputs(logits[0], logits[1], 0.5, LossKind.CROSS_ENTROPY))
    np.testing.assert_allclose(even_ensemble(logits, LossKind.MSE), np.mean(logits, axis=0), rtol=1e-5)
    np.testing.assert_array_equal(even_ensemble(logits[:1], LossKind.CROSS_ENTROPY), logits[0])
    with pytest.raises(ValueError, match="at least one"):
        even_ensemble([], LossKind.MSE)
