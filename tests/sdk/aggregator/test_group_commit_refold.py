"""The refold path at the root (contributor lists, device_overlap in a batch): a regression test from the review of
an intake that folded each update as it was admitted (measured and reverted, see docs/benchmarks.md).

A device_overlap refusal happens inside the write transaction, after the batch was folded: the intake refolds the
aggregates it kept. Real regional aggregators close real rounds; the root's intake takes their sealed aggregates as
ONE batch (``UpdateIntake.handle_batch``, the intake's public batch entry; the root and middle services hand it one
aggregate at a time today, so in production this path is reached only by batching).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from device_agent.protocol.envelope import open_update
from sdk.aggregation import StreamingWeightedMean
from sdk.aggregator import IncomingUpdate, RegionalAggregator, RootAggregator, Verdict
from sdk.aggregator.contributors import split_contributors
from tests.sdk.aggregator import scenario


def _closed_region(open_region: Callable[..., RegionalAggregator], region: str,
                   devices: list[scenario.DeviceUpdate]) -> bytes:
    aggregator = open_region(region, device_keys=scenario.device_keys(region) | scenario.device_keys("eu"))
    aggregator.start_round(0, scenario.initial_model())
    for update in devices:
        assert aggregator.handle_update(scenario.seal(update, region=region)).verdict is Verdict.ACCEPTED
    aggregator.close_round()
    pending = aggregator.pending_aggregate()
    assert pending is not None
    return pending


def _delta(blob: bytes) -> tuple[dict[str, np.ndarray], int]:
    opened = open_update(blob, recipient_key=scenario.encryption_key("root"),
                         sender_public_key=lambda s: scenario.signing_key(s).public_key())
    stripped, _ = split_contributors(opened)
    return dict(stripped.tensors), opened.header.sample_count


def test_group_commit_root_batch_with_a_device_overlap_answers_every_aggregate_and_counts_the_kept_one(
        open_region: Callable[..., RegionalAggregator], tmp_path: Path, clock: scenario.StepClock) -> None:
    shared = scenario.device_updates("eu", count=1)[0]  # re-provisioned into us with the same id and key
    eu = _closed_region(open_region, "eu", scenario.device_updates("eu", count=3))
    us = _closed_region(open_region, "us", [*scenario.device_updates("us", count=2), shared])
    root = RootAggregator.open(tmp_path / "root.sqlite", scenario.root_config(regions=("eu", "us"), clock=clock))
    root.start_round(0, scenario.initial_model())
    try:
        # eu is inserted first and claims the shared device; us is refused inside the transaction (device_overlap),
        # so the transaction keeps fewer aggregates than it folded: the refold path.
        answers = root._intake.handle_batch([IncomingUpdate(blob=eu, topic_sender="eu"),
                                             IncomingUpdate(blob=us, topic_sender="us")])
        assert [(a.verdict, a.reason) for a in answers] == [(Verdict.ACCEPTED, ""), (Verdict.REJECTED, "device_overlap")]
        assert root.status().accepted == 1
        # The running sum holds exactly eu's aggregate, as folding it alone gives (bit for bit).
        delta, samples = _delta(eu)
        alone = StreamingWeightedMean(expected_shapes={n: s for n, (s, _) in scenario.SPEC.items()})
        alone.accumulate(delta, float(samples))
        merged = root._intake.merge(0)
        assert merged.mean_delta is not None
        expected = alone.finalize()
        assert expected is not None
        assert sorted(merged.mean_delta) == sorted(expected)
        for name in expected:
            np.testing.assert_array_equal(merged.mean_delta[name], expected[name])
    finally:
        root.close()
