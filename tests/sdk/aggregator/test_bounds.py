"""Bounded influence in the aggregators, default policy, real crypto and a real SQLite store.

The reference is computed here with numpy from the documented rule
(docs/security.md): weight ``min(n, cap)``, delta scaled by ``min(1, B / ||d||)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from device_agent.protocol.envelope import seal_update
from device_agent.protocol.headers import MessageKind, UpdateHeader
from sdk.aggregation.influence import InfluencePolicy, RoundBounds
from sdk.aggregator import RegionalAggregator, RootAggregator, Verdict
from sdk.aggregator.contributors import CONTRIBUTORS_TENSOR, encode_contributors
from tests.sdk.aggregator import scenario

MAX_INT = (1 << 53) - 1


def _default(open_region: Callable[..., RegionalAggregator], **overrides: object) -> RegionalAggregator:
    overrides.setdefault("influence", InfluencePolicy())
    overrides.setdefault("norm_bound", None)  # the scenario's hard rejection bound is not part of the default
    region = open_region(**overrides)
    region.start_round(0, scenario.initial_model())
    return region


def _reference(updates: list[tuple[dict[str, np.ndarray], int]], bounds: RoundBounds) -> dict[str, np.ndarray]:
    """sum_k min(n_k, cap) clip(d_k) / sum_k min(n_k, cap), in float64."""
    total = 0.0
    acc = {name: np.zeros(shape, dtype=np.float64) for name, (shape, _) in scenario.SPEC.items()}
    for delta, samples in updates:
        weight = min(samples, bounds.weight_cap)
        norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in delta.values())))
        scale = 1.0 if bounds.clip_norm is None or norm <= bounds.clip_norm else bounds.clip_norm / norm
        for name in acc:
            acc[name] += weight * delta[name].astype(np.float64) * scale
        total += weight
    return {name: value / total for name, value in acc.items()}


def _attacker(delta: dict[str, np.ndarray], norm: float) -> dict[str, np.ndarray]:
    """``-delta`` rescaled to L2 norm ``norm``: the attack of the field test."""
    current = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in delta.values())))
    return {name: (-value * (norm / current)).astype(np.float32) for name, value in delta.items()}


def test_bounds_default_round_zero_weighs_devices_alike_and_clips_a_huge_update(
        open_region: Callable[..., RegionalAggregator]) -> None:
    region = _default(open_region)
    honest = scenario.device_updates(count=4)
    evil = scenario.DeviceUpdate(device=scenario.device_id("eu", 4), delta=_attacker(honest[0].delta, 4.6e4),
                                 samples=10**12, nonce=b"\x44" * 16)
    for update in [*honest, evil]:
        assert region.handle_update(scenario.seal(update)).verdict is Verdict.ACCEPTED
    aggregate = region.close_round()
    bounds = RoundBounds(clip_norm=1.0, weight_cap=1)  # the first round's default bounds
    expected = _reference([(u.delta, u.samples) for u in [*honest, evil]], bounds)
    assert aggregate.mean_delta is not None
    for name in expected:
        np.testing.assert_allclose(aggregate.mean_delta[name], expected[name], rtol=1e-6, atol=1e-7)
    # What one device moved, beyond the honest devices' own (bounded) mean: at most its share (1/5) x (bound + |honest|).
    honest_mean = _reference([(u.delta, u.samples) for u in honest], bounds)
    moved = np.sqrt(sum(np.sum((aggregate.mean_delta[n].astype(np.float64) - honest_mean[n]) ** 2) for n in expected))
    assert moved <= (1 / 5) * (1.0 + 1.0) + 1e-6
    assert aggregate.sample_count == 5  # bounded weights are what the root is told
    counters = region.status().counters
    # Round 0 weighs everyone 1, so every count above 1 was capped; the huge update (at least) was clipped.
    assert counters["clipped:sample_count"] == 5 and counters["clipped:norm"] >= 1


def test_bounds_next_round_follows_the_previous_rounds_median(open_region: Callable[..., RegionalAggregator]) -> None:
    region = _default(open_region)
    honest = scenario.device_updates(count=5)
    for update in honest:
        region.handle_update(scenario.seal(update))
    region.close_round()
    region.start_round(1, scenario.initial_model())
    record = region._intake.store.load_round()  # the bounds are stored with the round
    assert record is not None and record.bounds is not None
    norms = [float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in u.delta.values()))) for u in honest]
    assert record.bounds.clip_norm == pytest.approx(float(np.median(norms)))
    assert record.bounds.weight_cap == int(np.median([u.samples for u in honest]))
    # Round 1 folds with those bounds, an inflated count capped at the median.
    updates = scenario.device_updates(count=5, seed=1)
    inflated = scenario.DeviceUpdate(device=updates[0].device, delta=updates[0].delta, samples=10**12, nonce=b"\x51" * 16)
    updates[0] = inflated
    for update in updates:
        assert region.handle_update(scenario.seal(update, round=1)).verdict is Verdict.ACCEPTED
    aggregate = region.close_round()
    expected = _reference([(u.delta, u.samples) for u in updates], record.bounds)
    assert aggregate.mean_delta is not None
    for name in expected:
        np.testing.assert_allclose(aggregate.mean_delta[name], expected[name], rtol=1e-6, atol=1e-7)


def test_bounds_largest_sample_count_is_capped_and_the_close_keeps_every_accepted_update(
        open_region: Callable[..., RegionalAggregator]) -> None:
    """The field test: sample_count 2**53-1 made the region's close raise on every tick. Now it weighs the cap."""
    region = _default(open_region, influence=InfluencePolicy(weight="fixed", max_sample_count=(1 << 32) - 1))
    honest = scenario.device_updates(count=3)
    evil = scenario.DeviceUpdate(device=scenario.device_id("eu", 3), delta=honest[0].delta, samples=MAX_INT, nonce=b"\x53" * 16)
    for update in [*honest, evil]:
        assert region.handle_update(scenario.seal(update)).verdict is Verdict.ACCEPTED
    aggregate = region.close_round()  # must not raise
    assert aggregate.update_count == 4 and aggregate.blob is not None
    assert aggregate.sample_count == sum(u.samples for u in honest) + (1 << 32) - 1


def test_bounds_root_refuses_a_sample_total_past_2_53_without_losing_the_round(tmp_path) -> None:
    root = RootAggregator.open(tmp_path / "root.sqlite", scenario.root_config(regions=("eu", "us", "asia"),
                               policy=scenario.RoundPolicy(quorum=3, deadline_s=600.0, min_updates=0)))
    root.start_round(0, scenario.initial_model())
    delta = scenario.device_updates(count=1)[0].delta

    def aggregate(region: str, samples: int) -> bytes:
        header = UpdateHeader.create(kind=MessageKind.AGGREGATE, fleet=scenario.FLEET, sender=region, region=region, round=0,
                                     bundle_version=scenario.BUNDLE_VERSION, sample_count=samples)
        tensors = {**delta, CONTRIBUTORS_TENSOR: encode_contributors([(f"{region}-dev-0", samples)])}
        return seal_update(header, tensors, recipient_public_key=scenario.encryption_key("root").public_key(),
                           sender_key=scenario.signing_key(region))

    assert root.handle_aggregate(aggregate("eu", MAX_INT - 10)).verdict is Verdict.ACCEPTED
    refused = root.handle_aggregate(aggregate("us", 11))
    assert (refused.verdict, refused.reason) == (Verdict.REJECTED, "sample_count")
    assert root.handle_aggregate(aggregate("asia", 10)).verdict is Verdict.ACCEPTED
    root.close_round()  # must not raise
    assert root.status().round == 1
    root.close()


def test_bounds_unsafe_unbounded_policy_still_refuses_what_would_overflow_float32(
        open_region: Callable[..., RegionalAggregator]) -> None:
    region = _default(open_region, influence=InfluencePolicy(norm="unbounded", weight="fixed"))
    honest = scenario.device_updates(count=2)
    blast = {name: np.full(shape, 3.0e38, dtype=np.float32) for name, (shape, _) in scenario.SPEC.items()}
    evil = scenario.DeviceUpdate(device=scenario.device_id("eu", 2), delta=blast, samples=1, nonce=b"\x55" * 16)
    handled = region.handle_update(scenario.seal(evil))
    assert (handled.verdict, handled.reason) == (Verdict.REJECTED, "non_finite")
    for update in honest:
        assert region.handle_update(scenario.seal(update)).verdict is Verdict.ACCEPTED
    aggregate = region.close_round()
    assert aggregate.update_count == 2
    assert all(np.all(np.isfinite(v)) for v in aggregate.regional_params.values())


def test_bounds_regional_config_refuses_the_old_clip_norm_setting() -> None:
    from sdk.aggregation import AggregationConfig

    with pytest.raises(ValueError, match="influence"):
        scenario.regional_config(aggregation=AggregationConfig(clip_norm=1.0))
