"""Tests for sdk.aggregation.strategy: the configurable per-round aggregation rules."""

from __future__ import annotations

import numpy as np
import pytest

from sdk.aggregation.robust import coordinate_median, trimmed_mean
from sdk.aggregation.strategy import (
    AggregationConfig,
    AggregationRule,
    MeanRule,
    MedianRule,
    TrimmedMeanRule,
    make_rule,
)

from .known_answers import assert_params_close, known_answers, params

RULES = ["mean", "median", "trimmed_mean"]


def _fold_all(rule: AggregationRule) -> AggregationRule:
    k = known_answers()
    for update, weight in zip(k["updates"], k["weights"]):
        rule.accumulate(update, weight)
    return rule


@pytest.mark.parametrize(
    ("name", "cls", "streaming"),
    [("mean", MeanRule, True), ("median", MedianRule, False), ("trimmed_mean", TrimmedMeanRule, False)],
)
def test_make_rule_builds_the_configured_rule(name: str, cls: type, streaming: bool) -> None:
    rule = make_rule(AggregationConfig(rule=name))  # type: ignore[arg-type]
    assert type(rule) is cls
    assert rule.name == name
    assert rule.streaming is streaming


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "krum"}, "rule must be"),
        ({"rule": "trimmed_mean", "trim_fraction": 0.5}, "trim_fraction"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": float("nan")}, "clip_norm"),
    ],
)
def test_aggregation_config_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AggregationConfig(**kwargs)  # type: ignore[arg-type]


def test_aggregation_config_is_frozen_and_keyword_only() -> None:
    config = AggregationConfig()
    with pytest.raises(AttributeError):
        config.rule = "median"  # type: ignore[misc]
    with pytest.raises(TypeError):
        AggregationConfig("median")  # type: ignore[call-arg]


def test_mean_rule_matches_weighted_mean_known_answer() -> None:
    rule = _fold_all(make_rule(AggregationConfig(rule="mean")))
    k = known_answers()
    assert_params_close(rule.finalize(), k["weighted_mean"])
    assert rule.count == len(k["updates"])
    assert rule.total_weight == sum(k["weights"])


def test_median_rule_ignores_weights_and_skips_zero_weight_updates() -> None:
    k = known_answers()
    rule = _fold_all(make_rule(AggregationConfig(rule="median")))
    voting = [u for u, w in zip(k["updates"], k["weights"]) if w > 0]
    assert len(voting) == len(k["updates"]) - 1
    assert_params_close(rule.finalize(), coordinate_median(voting))  # type: ignore[arg-type]
    assert rule.total_weight == sum(k["weights"])


def test_trimmed_mean_rule_matches_the_function_on_voting_updates() -> None:
    k = known_answers()
    rule = _fold_all(make_rule(AggregationConfig(rule="trimmed_mean", trim_fraction=0.2)))
    voting = [u for u, w in zip(k["updates"], k["weights"]) if w > 0]
    assert_params_close(rule.finalize(), trimmed_mean(voting, 0.2))  # type: ignore[arg-type]


def test_rule_clips_each_update_before_folding() -> None:
    rule = make_rule(AggregationConfig(rule="mean", clip_norm=1.0))
    rule.accumulate(params(a=[3.0, 4.0]), 1)  # norm 5 -> [0.6, 0.8]
    rule.accumulate(params(a=[0.0, 0.5]), 1)  # within bound
    assert_params_close(rule.finalize(), params(a=[0.3, 0.65]))
    assert rule.clipped_count == 1


@pytest.mark.parametrize("name", RULES)
def test_rule_all_updates_rejected_finalizes_to_none(name: str) -> None:
    rule = make_rule(AggregationConfig(rule=name))  # type: ignore[arg-type]
    assert rule.finalize() is None
    assert rule.count == 0


@pytest.mark.parametrize("name", RULES)
def test_rule_only_zero_weights_finalizes_to_none(name: str) -> None:
    rule = make_rule(AggregationConfig(rule=name))  # type: ignore[arg-type]
    rule.accumulate(params(a=[1.0]), 0)
    assert rule.finalize() is None
    assert rule.count == 1


@pytest.mark.parametrize("name", RULES)
def test_rule_one_client_returns_its_delta(name: str) -> None:
    rule = make_rule(AggregationConfig(rule=name))  # type: ignore[arg-type]
    rule.accumulate(params(a=[1.0, -2.0], s=0.5), 9)
    assert_params_close(rule.finalize(), params(a=[1.0, -2.0], s=0.5))


@pytest.mark.parametrize("name", RULES)
def test_rule_rejects_mismatched_shape_and_keeps_state(name: str) -> None:
    rule = make_rule(AggregationConfig(rule=name, clip_norm=10.0))  # type: ignore[arg-type]
    rule.accumulate(params(a=[1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="shape"):
        rule.accumulate(params(a=[1.0, 2.0, 3.0]), 1)
    with pytest.raises(ValueError, match="weight"):
        rule.accumulate(params(a=[1.0, 2.0]), float("nan"))
    assert rule.count == 1 and rule.total_weight == 1.0
    assert_params_close(rule.finalize(), params(a=[1.0, 2.0]))


@pytest.mark.parametrize("name", RULES)
def test_rule_expected_shapes_checks_the_first_update(name: str) -> None:
    rule = make_rule(AggregationConfig(rule=name), expected_shapes={"a": (3,)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        rule.accumulate(params(a=[1.0, 2.0]), 1)


def test_mean_rule_state_round_trip_equals_uninterrupted() -> None:
    k = known_answers()
    pairs = list(zip(k["updates"], k["weights"]))
    uninterrupted = _fold_all(MeanRule(clip_norm=50.0))

    first = MeanRule(clip_norm=50.0)
    for update, weight in pairs[:4]:
        first.accumulate(update, weight)
    resumed = MeanRule.from_state(first.to_state(), clip_norm=50.0)
    for update, weight in pairs[4:]:
        resumed.accumulate(update, weight)

    expected, actual = uninterrupted.finalize(), resumed.finalize()
    assert expected is not None and actual is not None
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])
    assert (resumed.count, resumed.total_weight) == (uninterrupted.count, uninterrupted.total_weight)


def test_mean_rule_resumed_state_keeps_the_layout() -> None:
    first = MeanRule()
    first.accumulate(params(a=[1.0, 2.0]), 1)
    resumed = MeanRule.from_state(first.to_state())
    with pytest.raises(ValueError, match="shape"):
        resumed.accumulate(params(a=[1.0]), 1)
