"""Tests for sdk.aggregation.robust: norm clipping, coordinate-wise median, trimmed mean."""

from __future__ import annotations

import math

import numpy as np
import pytest

from device_agent.parameters import global_norm
from sdk.aggregation.robust import clip_by_norm, coordinate_median, scale_delta, trim_count, trimmed_mean

from .known_answers import assert_params_close, known_answers, params


def _column(values: list[float]) -> list[dict[str, np.ndarray]]:
    """One single-coordinate update per value."""
    return [params(x=[v]) for v in values]


def test_clip_by_norm_matches_known_answer() -> None:
    k = known_answers()["clip_by_norm"]
    delta = known_answers()["updates"][k["update_index"]]
    result = clip_by_norm(delta, k["max_norm"])
    assert_params_close(result.delta, k["expected"])
    assert result.norm == pytest.approx(k["norm"], rel=1e-12)
    assert result.clipped
    assert global_norm(result.delta) == pytest.approx(k["max_norm"], rel=1e-6)


def test_clip_by_norm_hand_computed() -> None:
    result = clip_by_norm(params(a=[3.0, 4.0]), 1.0)
    assert_params_close(result.delta, params(a=[0.6, 0.8]))
    assert result.norm == 5.0
    assert result.scale == pytest.approx(0.2)


def test_clip_by_norm_uses_one_norm_over_all_tensors() -> None:
    # Global norm of ([3], [4]) is 5; per-tensor clipping to 2.5 would leave [3] -> [2.5], [4] -> [2.5].
    result = clip_by_norm(params(a=[3.0], b=[4.0]), 2.5)
    assert_params_close(result.delta, params(a=[1.5], b=[2.0]))


@pytest.mark.parametrize("max_norm", [5.0, 100.0])
def test_clip_by_norm_within_bound_leaves_delta_unchanged(max_norm: float) -> None:
    delta = params(a=[3.0, 4.0])
    result = clip_by_norm(delta, max_norm)
    assert not result.clipped
    assert result.scale == 1.0
    assert_params_close(result.delta, delta)
    assert result.delta["a"] is not delta["a"]


def test_clip_by_norm_zero_delta_is_not_clipped() -> None:
    result = clip_by_norm(params(a=[0.0, 0.0]), 1.0)
    assert not result.clipped and result.norm == 0.0


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan"), float("inf")])
def test_clip_by_norm_rejects_bad_max_norm(max_norm: float) -> None:
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_norm(params(a=[1.0]), max_norm)


def test_clip_by_norm_rejects_non_finite_delta() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        clip_by_norm(params(a=[1.0, float("nan")]), 1.0)


def test_coordinate_median_matches_known_answer() -> None:
    k = known_answers()
    assert_params_close(coordinate_median(k["updates"]), k["coordinate_median"])


@pytest.mark.parametrize(
    ("values", "expected"),
    [([5.0, -1.0, 2.0], 2.0), ([4.0, 1.0, 3.0, 2.0], 2.5), ([7.0], 7.0)],
)
def test_coordinate_median_hand_computed_odd_even_and_one_client(values: list[float], expected: float) -> None:
    assert_params_close(coordinate_median(_column(values)), params(x=[expected]))


def test_coordinate_median_resists_one_outlier_per_coordinate() -> None:
    updates = [params(x=[1.0, 2.0]), params(x=[1.1, 2.1]), params(x=[1e6, -1e6])]
    assert_params_close(coordinate_median(updates), params(x=[1.1, 2.0]))


def test_coordinate_median_empty_returns_none() -> None:
    assert coordinate_median([]) is None


def test_coordinate_median_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="update 1"):
        coordinate_median([params(x=[1.0, 2.0]), params(x=[1.0])])


def test_coordinate_median_rejects_a_single_dict_instead_of_a_list() -> None:
    with pytest.raises(TypeError, match="sequence"):
        coordinate_median(params(x=[1.0]))  # type: ignore[arg-type]


def test_trimmed_mean_matches_known_answer() -> None:
    k = known_answers()
    tm = k["trimmed_mean"]
    assert trim_count(len(k["updates"]), tm["trim_fraction"]) == tm["cut_per_end"]
    assert_params_close(trimmed_mean(k["updates"], tm["trim_fraction"]), tm["expected"])


def test_trimmed_mean_hand_computed_cuts_each_end() -> None:
    # beta 0.2 of 5 cuts 1 from each end: mean(2, 3, 4) = 3.
    assert_params_close(trimmed_mean(_column([100.0, 2.0, 1.0, 4.0, 3.0]), 0.2), params(x=[3.0]))


def test_trimmed_mean_zero_fraction_is_the_unweighted_mean() -> None:
    assert_params_close(trimmed_mean(_column([1.0, 2.0, 6.0]), 0.0), params(x=[3.0]))


def test_trimmed_mean_small_fraction_of_few_updates_cuts_nothing() -> None:
    # floor(0.1 * 3) = 0.
    assert trim_count(3, 0.1) == 0
    assert_params_close(trimmed_mean(_column([1.0, 2.0, 6.0]), 0.1), params(x=[3.0]))


@pytest.mark.parametrize("fraction", [0.5, 0.6, 1.0, -0.1, float("nan")])
def test_trimmed_mean_rejects_fraction_outside_zero_to_half(fraction: float) -> None:
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(_column([1.0, 2.0, 3.0, 4.0]), fraction)


def test_trimmed_mean_empty_returns_none() -> None:
    assert trimmed_mean([], 0.2) is None


def test_trimmed_mean_rejects_non_finite_update() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        trimmed_mean(_column([1.0, math.inf, 3.0]), 0.2)


def test_scale_delta_gives_clip_by_norm_values_bit_for_bit() -> None:
    rng = np.random.default_rng(11)
    delta = {"w": rng.normal(size=(5, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    clipped = clip_by_norm(delta, 0.5)
    assert clipped.clipped
    scaled = scale_delta(delta, clipped.scale)
    for name, value in clipped.delta.items():
        assert scaled[name].dtype == np.float32 and np.array_equal(scaled[name], value)
