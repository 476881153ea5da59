"""Closing a round's arithmetic: every member's share of the round combined by the aggregation rule.

The streaming mean merges the members' float64 running sums in member-name
order (reproducible; one member gives exactly its own mean). The buffered
rules (median, trimmed mean) replay every stored delta of the round in
commit order, clipped to the round's bound exactly as when it was accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sdk.aggregation import AggregationConfig, StreamingWeightedMean, WeightedMeanState, make_rule
from sdk.aggregator.store import AggregatorStore


@dataclass(frozen=True, kw_only=True)
class MergedRound:
    """A round's result over every member: ``mean_delta`` None when nothing was accepted;
    ``sample_count`` sums the bounded weights (what the round reports upwards)."""

    mean_delta: dict[str, np.ndarray] | None
    update_count: int
    sample_count: int


def merge_round(store: AggregatorStore, round: int, *, aggregation: AggregationConfig, shapes: Mapping[str, tuple[int, ...]],
                clip_norm: float | None) -> MergedRound:
    """``round``'s members combined by ``aggregation.rule``; ``clip_norm`` is the round's bound (None: unbounded)."""
    partials = store.partials(round)
    count = sum(p.state.count for p in partials)
    samples = sum(p.samples for p in partials)
    if aggregation.rule == "mean":
        mean = merge_means([p.state for p in partials if p.state.count])
    else:
        config = AggregationConfig(rule=aggregation.rule, trim_fraction=aggregation.trim_fraction, clip_norm=clip_norm)
        rule = make_rule(config, expected_shapes=shapes)
        for delta, weight in store.buffered_deltas(round):
            rule.accumulate(delta, weight)
        mean = rule.finalize()
    return MergedRound(mean_delta=mean, update_count=count, sample_count=samples)


def merge_means(states: list[WeightedMeanState]) -> dict[str, np.ndarray] | None:
    """The weighted mean over several running sums; one sum gives exactly its own mean; None for none."""
    if not states:
        return None
    sums = {name: np.array(value, dtype=np.float64) for name, value in states[0].sums.items()}
    total, count = states[0].total_weight, states[0].count
    for state in states[1:]:
        for name, value in state.sums.items():
            sums[name] += value
        total += state.total_weight
        count += state.count
    return StreamingWeightedMean.from_state(WeightedMeanState(sums=sums, total_weight=total, count=count)).finalize()
