"""Tests for sdk.aggregation.mixing: regional/global interpolation and the root's combination."""

from __future__ import annotations

import pytest

from sdk.aggregation.mixing import combine_regions, mix_regional
from sdk.aggregation.weighted_mean import weighted_mean

from .known_answers import assert_params_close, known_answers, params


def test_mix_regional_matches_known_answer() -> None:
    k = known_answers()
    m = k["mix_regional"]
    result = mix_regional(
        k["updates"][m["regional_index"]], k["updates"][m["global_index"]], regional_weight=m["regional_weight"]
    )
    assert_params_close(result, m["expected"])


def test_mix_regional_hand_computed() -> None:
    # 0.25 * [4, 8] + 0.75 * [0, 4] = [1, 5]
    result = mix_regional(params(w=[4.0, 8.0]), params(w=[0.0, 4.0]), regional_weight=0.25)
    assert_params_close(result, params(w=[1.0, 5.0]))


@pytest.mark.parametrize(("weight", "expected"), [(0.0, [0.0, 4.0]), (1.0, [4.0, 8.0])])
def test_mix_regional_endpoints_select_one_model(weight: float, expected: list[float]) -> None:
    result = mix_regional(params(w=[4.0, 8.0]), params(w=[0.0, 4.0]), regional_weight=weight)
    assert_params_close(result, params(w=expected))


def test_mix_regional_without_regional_model_returns_a_copy_of_global() -> None:
    global_ = params(w=[1.0, 2.0])
    result = mix_regional(None, global_, regional_weight=0.7)
    assert_params_close(result, global_)
    assert result["w"] is not global_["w"]


@pytest.mark.parametrize("weight", [-0.1, 1.1, float("nan"), float("inf")])
def test_mix_regional_rejects_weight_outside_unit_interval(weight: float) -> None:
    with pytest.raises(ValueError, match="regional_weight"):
        mix_regional(params(w=[1.0]), params(w=[2.0]), regional_weight=weight)


def test_mix_regional_rejects_mismatched_layout() -> None:
    with pytest.raises(ValueError, match="regional model"):
        mix_regional(params(w=[1.0, 2.0]), params(w=[2.0]), regional_weight=0.5)


def test_combine_regions_matches_known_answer_by_samples_and_uniform() -> None:
    k = known_answers()
    c = k["combine_regions"]
    means = [k["updates"][i] for i in c["region_indices"]]
    assert_params_close(combine_regions(means, c["region_weights"], by="samples"), c["by_samples"])
    assert_params_close(combine_regions(means, c["region_weights"], by="uniform"), c["uniform"])


def test_combine_regions_hand_computed_by_samples_and_uniform() -> None:
    means = [params(w=[0.0]), params(w=[4.0])]
    assert_params_close(combine_regions(means, [3, 1], by="samples"), params(w=[1.0]))
    assert_params_close(combine_regions(means, [3, 1], by="uniform"), params(w=[2.0]))


@pytest.mark.parametrize("by", ["samples", "uniform"])
def test_combine_regions_one_region_returns_its_mean(by: str) -> None:
    mean = params(w=[1.5, -2.0])
    assert_params_close(combine_regions([mean], [42], by=by), mean)  # type: ignore[arg-type]


@pytest.mark.parametrize("by", ["samples", "uniform"])
def test_combine_regions_zero_weight_region_is_ignored_even_with_a_mean(by: str) -> None:
    means = [params(w=[2.0]), params(w=[1000.0]), None]
    assert_params_close(combine_regions(means, [5, 0, 0], by=by), params(w=[2.0]))  # type: ignore[arg-type]


@pytest.mark.parametrize("by", ["samples", "uniform"])
def test_combine_regions_all_zero_weights_returns_none(by: str) -> None:
    assert combine_regions([params(w=[1.0]), None], [0, 0], by=by) is None  # type: ignore[arg-type]


def test_combine_regions_no_regions_returns_none() -> None:
    assert combine_regions([], []) is None


def test_combine_regions_by_samples_equals_flat_fedavg_over_all_devices() -> None:
    k = known_answers()
    updates, weights = k["updates"], k["weights"]
    groups = [[0, 1, 2], [3, 4], [5, 6]]
    region_means = [weighted_mean([updates[i] for i in g], [weights[i] for i in g]) for g in groups]
    region_counts = [sum(weights[i] for i in g) for g in groups]
    assert_params_close(combine_regions(region_means, region_counts, by="samples"), k["weighted_mean"])


def test_combine_regions_rejects_missing_mean_with_positive_weight() -> None:
    with pytest.raises(ValueError, match="region 1 has weight"):
        combine_regions([params(w=[1.0]), None], [1, 2])


def test_combine_regions_rejects_unknown_weighting() -> None:
    with pytest.raises(ValueError, match="by must be"):
        combine_regions([params(w=[1.0])], [1], by="devices")  # type: ignore[arg-type]


def test_combine_regions_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 region means but 1 region weights"):
        combine_regions([params(w=[1.0]), params(w=[2.0])], [1])


@pytest.mark.parametrize("weight", [-1, float("nan")])
def test_combine_regions_rejects_bad_region_weight(weight: float) -> None:
    with pytest.raises(ValueError, match=r"region_weights\[0\]"):
        combine_regions([params(w=[1.0])], [weight])


def test_combine_regions_rejects_regions_with_different_layouts() -> None:
    with pytest.raises(ValueError, match="shape"):
        combine_regions([params(w=[1.0]), params(w=[1.0, 2.0])], [1, 1])
