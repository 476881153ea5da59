"""The influence bounds: first-round bounds, how the next round's bounds follow the previous round's updates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdk.aggregation.influence import MAX_SAMPLE_COUNT, InfluencePolicy, RoundBounds, first_bounds, next_bounds


def test_influence_default_is_bounded_and_starts_uniform() -> None:
    policy = InfluencePolicy()
    assert not policy.unsafe
    assert first_bounds(policy) == RoundBounds(clip_norm=1.0, weight_cap=1)


def test_influence_fixed_modes_keep_their_bounds_whatever_the_history() -> None:
    policy = InfluencePolicy(norm="fixed", norm_bound=3.0, weight="fixed", max_sample_count=500)
    bounds = first_bounds(policy)
    assert bounds == RoundBounds(clip_norm=3.0, weight_cap=500)
    assert next_bounds(policy, bounds, norms=[100.0] * 10, sample_counts=[10] * 10) == bounds


def test_influence_adaptive_bounds_follow_the_previous_rounds_median() -> None:
    policy = InfluencePolicy()
    norms = [0.5, 0.7, 0.9, 1.1, 40_000.0]  # one huge update cannot move the median
    counts = [60, 80, 100, 120, 10**12]
    bounds = next_bounds(policy, first_bounds(policy), norms=norms, sample_counts=counts)
    assert bounds.clip_norm == pytest.approx(0.9)  # the median norm
    assert bounds.weight_cap == 100  # the median count
    # The quantile and the multipliers are the policy's.
    loose = InfluencePolicy(norm_quantile=0.25, norm_multiplier=2.0, weight_multiplier=1.5)
    assert next_bounds(loose, first_bounds(loose), norms=norms, sample_counts=counts) == RoundBounds(
        clip_norm=2.0 * float(np.quantile(norms, 0.25)), weight_cap=150)


def test_influence_too_little_history_carries_the_bounds_over() -> None:
    policy = InfluencePolicy(min_history=3)
    previous = RoundBounds(clip_norm=2.5, weight_cap=40)
    assert next_bounds(policy, previous, norms=[9.0, 9.0], sample_counts=[900, 900]) == previous
    # All-zero updates give no usable norm statistic: the bound carries over, the cap still moves.
    assert next_bounds(policy, previous, norms=[0.0] * 4, sample_counts=[10] * 4) == RoundBounds(clip_norm=2.5, weight_cap=10)


def test_influence_weight_cap_never_exceeds_the_fleet_cap() -> None:
    policy = InfluencePolicy(max_sample_count=1000)
    bounds = next_bounds(policy, first_bounds(policy), norms=[1.0] * 5, sample_counts=[10**9] * 5)
    assert bounds.weight_cap == 1000
    assert bounds.weight(10**12) == 1000 and bounds.weight(7) == 7


def test_influence_unbounded_norm_is_named_unsafe_and_never_clips() -> None:
    policy = InfluencePolicy(norm="unbounded")
    assert policy.unsafe
    bounds = first_bounds(policy)
    assert bounds.clip_norm is None and bounds.clip_scale(1e30) == 1.0
    assert next_bounds(policy, bounds, norms=[1.0] * 5, sample_counts=[5] * 5).clip_norm is None


def test_influence_clip_scale() -> None:
    bounds = RoundBounds(clip_norm=2.0, weight_cap=1)
    assert bounds.clip_scale(1.0) == 1.0 and bounds.clip_scale(2.0) == 1.0
    assert bounds.clip_scale(8.0) == pytest.approx(0.25)


@pytest.mark.parametrize("fields", [
    {"norm": "loose"}, {"weight": "claimed"}, {"norm_bound": 0.0}, {"norm_bound": math.inf}, {"norm_quantile": 0.0},
    {"norm_quantile": 1.5}, {"norm_multiplier": -1.0}, {"weight_multiplier": 0.0}, {"max_sample_count": 0},
    {"max_sample_count": MAX_SAMPLE_COUNT + 1}, {"min_history": 0}, {"max_sample_count": True},
])
def test_influence_policy_refuses_bad_values(fields: dict) -> None:
    with pytest.raises(ValueError):
        InfluencePolicy(**fields)


@pytest.mark.parametrize("fields", [{"clip_norm": 0.0, "weight_cap": 1}, {"clip_norm": None, "weight_cap": 0},
                                    {"clip_norm": 1.0, "weight_cap": MAX_SAMPLE_COUNT + 1}])
def test_influence_round_bounds_refuse_bad_values(fields: dict) -> None:
    with pytest.raises(ValueError):
        RoundBounds(**fields)
