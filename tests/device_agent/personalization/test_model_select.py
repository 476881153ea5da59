"""Keeping a candidate on validation: ties go to the fallback (the local model); early stopping keeps the best epoch."""

from __future__ import annotations

import pytest

from device_agent.personalization.model_select import ModelScore, best_index, choose_model, early_stop_epoch


def _s(name: str, accuracy: float | None, loss: float) -> ModelScore:
    return ModelScore(name=name, accuracy=accuracy, loss=loss)


def test_the_fallback_keeps_every_accuracy_tie_even_against_a_lower_loss() -> None:
    scores = [_s("served", 0.9, 0.1), _s("local", 0.9, 0.8), _s("FT(all)", 0.8, 0.05)]
    assert choose_model(scores, fallback="local").name == "local"
    # without a fallback the tie goes to the lower loss
    assert choose_model(scores).name == "served"


def test_a_strictly_better_candidate_beats_the_fallback_and_the_lowest_loss_wins_its_ties() -> None:
    scores = [_s("local", 0.8, 0.2), _s("served", 0.9, 0.5), _s("FT(all)", 0.9, 0.3)]
    choice = choose_model(scores, fallback="local")
    assert (choice.name, choice.accuracy, choice.loss) == ("FT(all)", 0.9, 0.3)
    assert choice.scores == tuple(scores)
    # equal accuracy and loss: the candidate listed first
    assert choose_model([_s("a", 0.5, 0.1), _s("b", 0.5, 0.1)]).name == "a"


def test_regression_scores_by_loss_alone() -> None:
    scores = [_s("local", None, 0.4), _s("served", None, 0.3)]
    assert choose_model(scores, fallback="local").name == "served"
    assert choose_model([_s("local", None, 0.3), _s("served", None, 0.3)], fallback="local").name == "local"


def test_bad_candidate_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="no candidates"):
        choose_model([])
    with pytest.raises(ValueError, match="repeat"):
        choose_model([_s("a", 0.5, 0.1), _s("a", 0.6, 0.1)])
    with pytest.raises(ValueError, match="not a candidate"):
        choose_model([_s("a", 0.5, 0.1)], fallback="local")


def test_early_stopping_waits_patience_epochs_without_a_better_one() -> None:
    epochs = [_s("epoch 0", 0.5, 1.0), _s("epoch 1", 0.7, 0.9), _s("epoch 2", 0.7, 0.95)]
    assert best_index(epochs) == 1
    assert early_stop_epoch(epochs, patience=2) is None  # one epoch without progress so far
    epochs.append(_s("epoch 3", 0.6, 0.5))
    assert early_stop_epoch(epochs, patience=2) == 1
    # the same accuracy with a lower loss counts as better
    epochs.append(_s("epoch 4", 0.7, 0.8))
    assert best_index(epochs) == 4 and early_stop_epoch(epochs, patience=2) is None
    with pytest.raises(ValueError, match="patience"):
        early_stop_epoch(epochs, patience=0)
