"""Tests for device_agent.personalization.fedfomo: FedFomo weights, update and peer selection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.personalization.fedfomo import (
    exploration_rate,
    fomo_delta,
    fomo_scores,
    fomo_update,
    fomo_weights,
    parameter_distance,
    select_candidates,
    update_affinity,
)

DATA = Path(__file__).parent / "data" / "fedfomo_known_answers.json"
REPO = Path(__file__).resolve().parents[3]


def _params(**arrays: Any) -> dict[str, np.ndarray]:
    return {name: np.asarray(value, dtype=np.float32) for name, value in arrays.items()}


def _known() -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(DATA.read_text())
    for key in ("own", "delta", "parameters"):
        raw[key] = _params(**raw[key])
    raw["candidates"] = [_params(**c) for c in raw["candidates"]]
    return raw


def _assert_params_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert actual[name].dtype == np.float32 and actual[name].shape == value.shape, name
        np.testing.assert_allclose(actual[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


def test_fomo_update_matches_known_answer() -> None:
    k = _known()
    result = fomo_update(k["own"], k["candidates"], own_loss=k["own_loss"], candidate_losses=k["candidate_losses"])
    np.testing.assert_allclose(result.distances, k["distances"], rtol=1e-12)
    np.testing.assert_allclose(result.scores, k["scores"], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(result.weights, k["weights"], rtol=1e-9, atol=1e-15)
    _assert_params_close(result.delta, k["delta"])
    _assert_params_close(result.parameters, k["parameters"])
    assert not result.kept_own


def test_fomo_update_all_candidates_worse_keeps_own_model() -> None:
    own = _params(w=[1.0, 2.0], b=0.5)
    candidates = [_params(w=[3.0, 2.0], b=0.5), _params(w=[1.0, -2.0], b=0.0)]
    result = fomo_update(own, candidates, own_loss=0.4, candidate_losses=[0.9, 0.4])
    np.testing.assert_array_equal(result.weights, [0.0, 0.0])
    assert result.kept_own
    _assert_params_close(result.delta, _params(w=[0.0, 0.0], b=0.0))
    _assert_params_close(result.parameters, own)


def test_fomo_update_one_strictly_better_candidate_takes_all_the_weight() -> None:
    own = _params(w=[0.0, 0.0])
    better = _params(w=[3.0, 4.0])  # distance 5, score (1.0 - 0.5) / 5 = 0.1
    worse = _params(w=[-1.0, 0.0])  # score (1.0 - 2.0) / 1 = -1
    result = fomo_update(own, [worse, better], own_loss=1.0, candidate_losses=[2.0, 0.5])
    np.testing.assert_allclose(result.scores, [-1.0, 0.1])
    np.testing.assert_array_equal(result.weights, [0.0, 1.0])
    _assert_params_close(result.delta, _params(w=[3.0, 4.0]))
    _assert_params_close(result.parameters, better)


def test_fomo_update_no_candidates_keeps_own_model() -> None:
    own = _params(w=[1.0])
    result = fomo_update(own, [], own_loss=1.0, candidate_losses=[])
    assert result.weights.shape == (0,)
    assert result.kept_own
    _assert_params_close(result.parameters, own)


def test_fomo_update_does_not_modify_inputs() -> None:
    k = _known()
    own_before = {n: v.copy() for n, v in k["own"].items()}
    fomo_update(k["own"], k["candidates"], own_loss=k["own_loss"], candidate_losses=k["candidate_losses"])
    for name, value in own_before.items():
        np.testing.assert_array_equal(k["own"][name], value)


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        (_params(w=[1.0, 2.0, 3.0]), "shape"),
        (_params(v=[1.0, 2.0]), "missing parameters"),
        (_params(w=[1.0, float("nan")]), "NaN or infinite"),
    ],
)
def test_fomo_update_rejects_mismatched_or_non_finite_candidate(candidate: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fomo_update(_params(w=[0.0, 0.0]), [candidate], own_loss=1.0, candidate_losses=[0.5])


def test_fomo_update_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="1 candidates but 2 losses"):
        fomo_update(_params(w=[0.0]), [_params(w=[1.0])], own_loss=1.0, candidate_losses=[0.5, 0.2])


def test_parameter_distance_flattens_all_shared_tensors() -> None:
    assert parameter_distance(_params(a=[0.0], b=[[0.0]]), _params(a=[3.0], b=[[4.0]])) == 5.0


def test_fomo_scores_hand_computed() -> None:
    # (1.0 - 0.5) / 2 = 0.25; (1.0 - 1.5) / 0.5 = -1
    np.testing.assert_allclose(fomo_scores(1.0, [0.5, 1.5], [2.0, 0.5]), [0.25, -1.0])


def test_fomo_scores_zero_distance_scores_zero_even_when_loss_is_lower() -> None:
    np.testing.assert_array_equal(fomo_scores(1.0, [0.2], [0.0]), [0.0])


def test_fomo_scores_infinite_candidate_loss_gets_zero_weight() -> None:
    scores = fomo_scores(1.0, [float("inf"), 0.5], [1.0, 1.0])
    assert scores[0] == -np.inf
    np.testing.assert_array_equal(fomo_weights(scores), [0.0, 1.0])


@pytest.mark.parametrize(
    ("own_loss", "losses", "distances", "message"),
    [
        (float("nan"), [0.5], [1.0], "own_loss"),
        (float("inf"), [0.5], [1.0], "own_loss"),
        (1.0, [float("nan")], [1.0], "NaN"),
        (1.0, [0.5], [-1.0], "distances"),
        (1.0, [0.5, 0.4], [1.0], "2 candidate losses but 1 distances"),
    ],
)
def test_fomo_scores_rejects_bad_inputs(own_loss: float, losses: list[float], distances: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fomo_scores(own_loss, losses, distances)


def test_fomo_weights_clip_negatives_and_normalise_to_one() -> None:
    np.testing.assert_allclose(fomo_weights([0.3, -2.0, 0.1, 0.0]), [0.75, 0.0, 0.25, 0.0])


def test_fomo_weights_all_non_positive_are_all_zero() -> None:
    np.testing.assert_array_equal(fomo_weights([-1.0, 0.0, -np.inf]), [0.0, 0.0, 0.0])


def test_fomo_weights_huge_scores_do_not_overflow() -> None:
    np.testing.assert_allclose(fomo_weights([1e308, 1e308]), [0.5, 0.5])


def test_fomo_delta_rejects_negative_weight() -> None:
    with pytest.raises(ValueError, match="weights"):
        fomo_delta(_params(w=[0.0]), [_params(w=[1.0])], [-0.5])


def test_update_affinity_adds_weights_at_candidate_indices() -> None:
    affinity = np.array([0.0, 1.0, 0.5, 0.0])
    updated = update_affinity(affinity, [3, 1], [0.25, 0.75])
    np.testing.assert_allclose(updated, [0.0, 1.75, 0.5, 0.25])
    np.testing.assert_array_equal(affinity, [0.0, 1.0, 0.5, 0.0])  # input untouched


def test_update_affinity_with_no_candidates_is_unchanged() -> None:
    np.testing.assert_array_equal(update_affinity(np.array([1.0, 2.0]), [], []), [1.0, 2.0])


@pytest.mark.parametrize(
    ("indices", "weights", "message"),
    [([1, 1], [0.5, 0.5], "distinct"), ([4], [1.0], "range"), ([0, 1], [1.0], "2 candidate indices but 1 weights")],
)
def test_update_affinity_rejects_bad_indices(indices: list[int], weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        update_affinity(np.zeros(3), indices, weights)


@pytest.mark.parametrize(("round_index", "expected"), [(0, 0.3), (1, 0.25), (4, 0.1), (6, 0.0), (100, 0.0)])
def test_exploration_rate_decays_linearly_to_zero(round_index: int, expected: float) -> None:
    assert exploration_rate(round_index) == pytest.approx(expected)


def test_select_candidates_greedy_takes_top_k_by_affinity_excluding_own() -> None:
    affinity = np.array([0.0, 3.0, 1.0, 2.0, 5.0])
    picked = select_candidates(affinity, k=3, epsilon=0.0, rng=np.random.default_rng(0), exclude=[4])
    np.testing.assert_array_equal(picked, [1, 3, 2])
    assert picked.dtype == np.int64


def test_select_candidates_returns_every_eligible_peer_when_fewer_than_k() -> None:
    picked = select_candidates(np.zeros(3), k=8, epsilon=0.3, rng=np.random.default_rng(1), exclude={0})
    assert sorted(picked.tolist()) == [1, 2]


def test_select_candidates_k_zero_or_no_peers_is_empty() -> None:
    assert select_candidates(np.zeros(4), k=0, epsilon=0.5, rng=np.random.default_rng(0)).size == 0
    assert select_candidates(np.zeros(1), k=3, epsilon=0.5, rng=np.random.default_rng(0), exclude=[0]).size == 0


def test_select_candidates_same_seed_same_choice() -> None:
    affinity = np.random.default_rng(7).random(20)
    first = select_candidates(affinity, k=5, epsilon=0.5, rng=np.random.default_rng(123), exclude=[3])
    again = select_candidates(affinity, k=5, epsilon=0.5, rng=np.random.default_rng(123), exclude=[3])
    np.testing.assert_array_equal(first, again)


def test_select_candidates_full_exploration_picks_distinct_peers_uniformly() -> None:
    rng = np.random.default_rng(5)
    affinity = np.array([100.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    counts = np.zeros(6)
    for _ in range(600):
        picked = select_candidates(affinity, k=2, epsilon=1.0, rng=rng, exclude=[5])
        assert len(set(picked.tolist())) == 2 and 5 not in picked
        counts[picked] += 1
    # Each of the 5 eligible peers is picked 2/5 of the time, whatever its affinity.
    np.testing.assert_allclose(counts[:5] / 600, 0.4, atol=0.08)


def test_select_candidates_explores_at_rate_epsilon() -> None:
    rng = np.random.default_rng(11)
    affinity = np.array([0.0, 0.0, 9.0, 0.0, 0.0])
    draws = 3000
    not_top = sum(int(select_candidates(affinity, k=1, epsilon=0.3, rng=rng)[0] != 2) for _ in range(draws))
    # A random pick misses the top peer 4/5 of the time: P(not top) = 0.3 * 0.8 = 0.24 (sd ~0.008).
    assert abs(not_top / draws - 0.24) < 0.035


def test_select_candidates_breaks_ties_at_random() -> None:
    picks = {int(select_candidates(np.zeros(4), k=1, epsilon=0.0, rng=np.random.default_rng(s))[0]) for s in range(40)}
    assert picks == {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"k": -1, "epsilon": 0.1}, ValueError),
        ({"k": 2, "epsilon": 1.5}, ValueError),
        ({"k": 2, "epsilon": 0.1, "rng": np.random.RandomState(0)}, TypeError),
    ],
)
def test_select_candidates_rejects_bad_arguments(kwargs: dict[str, Any], error: type[Exception]) -> None:
    kwargs.setdefault("rng", np.random.default_rng(0))
    with pytest.raises(error):
        select_candidates(np.zeros(4), **kwargs)


def test_select_candidates_rejects_non_finite_affinity() -> None:
    with pytest.raises(ValueError, match="affinity"):
        select_candidates(np.array([0.0, np.nan]), k=1, epsilon=0.0, rng=np.random.default_rng(0))


def test_fedfomo_imports_neither_torch_nor_onnx_nor_sdk() -> None:
    code = (
        "import sys, device_agent.personalization.fedfomo\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'onnx', 'onnxruntime', 'sdk'}))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
