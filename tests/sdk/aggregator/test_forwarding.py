"""Region -> root with real crypto and stores: receipts for aggregates, contributor lists, the root's deadline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device_agent.protocol.envelope import seal_update
from device_agent.protocol.headers import MessageKind, UpdateHeader
from device_agent.protocol.receipts import Receipt, sign_receipt
from sdk.aggregator import RegionalAggregator, RootAggregator, Verdict
from sdk.aggregator.contributors import CONTRIBUTORS_TENSOR, encode_contributors
from tests.sdk.aggregator import scenario


def _root(tmp_path: Path, clock: scenario.StepClock, regions: tuple[str, ...] = ("eu", "us")) -> RootAggregator:
    root = RootAggregator.open(tmp_path / "root.sqlite", scenario.root_config(regions=regions, clock=clock))
    root.start_round(0, scenario.initial_model())
    return root


def _closed_region(open_region: Callable[..., RegionalAggregator], region: str = "eu", count: int = 3,
                   devices: list[scenario.DeviceUpdate] | None = None) -> RegionalAggregator:
    aggregator = open_region(region, device_keys=scenario.device_keys(region) | scenario.device_keys("eu"))
    aggregator.start_round(0, scenario.initial_model())
    for update in devices or scenario.device_updates(region, count=count):
        assert aggregator.handle_update(scenario.seal(update, region=region)).verdict is Verdict.ACCEPTED
    aggregator.close_round()
    return aggregator


def test_forwarding_region_resends_until_the_roots_receipt_then_stops(
        open_region: Callable[..., RegionalAggregator], tmp_path: Path, clock: scenario.StepClock) -> None:
    region = _closed_region(open_region)
    root = _root(tmp_path, clock)
    pending = region.pending_aggregate()
    assert pending is not None
    first = root.handle_aggregate(pending, topic_region="eu")
    again = root.handle_aggregate(pending, topic_region="eu")  # the receipt was lost: the resend is a duplicate
    assert (first.verdict, again.verdict) == (Verdict.ACCEPTED, Verdict.DUPLICATE)
    assert root.status().accepted == 1
    # A receipt from anyone but the root, or for another aggregate, changes nothing.
    forged = sign_receipt(Receipt.answering(first.header, issuer="root"), signer_key=scenario.signing_key("mallory"))
    assert region.handle_root_receipt(forged).status == "ignored"
    other = UpdateHeader.create(kind=MessageKind.AGGREGATE, fleet=scenario.FLEET, sender="eu", region="eu", round=0,
                                bundle_version=scenario.BUNDLE_VERSION, sample_count=1)
    stray = sign_receipt(Receipt.answering(other, issuer="root"), signer_key=scenario.signing_key("root"))
    assert region.handle_root_receipt(stray).status == "ignored"
    assert region.pending_aggregate() == pending
    assert first.receipt is not None
    answer = region.handle_root_receipt(first.receipt)
    assert (answer.status, answer.round, answer.settled) == ("accepted", 0, True)
    assert region.pending_aggregate() is None
    assert region.handle_root_receipt(again.receipt or b"").status == "accepted"  # the first answer stands
    counters = region.status().counters
    assert counters["aggregate_acknowledged"] == 1
    assert counters["root_receipt_ignored:auth"] == 1 and counters["root_receipt_ignored:not_current"] == 1
    root.close()


def test_forwarding_answer_survives_a_restart_and_a_refusal_is_recorded(
        open_region: Callable[..., RegionalAggregator], tmp_path: Path, clock: scenario.StepClock) -> None:
    region = _closed_region(open_region, count=2)
    pending = region.pending_aggregate()
    assert pending is not None
    header = UpdateHeader.from_bytes(pending[7:7 + int.from_bytes(pending[5:7], "little")])
    refusal = sign_receipt(Receipt.answering(header, issuer="root", rejection=_stale()), signer_key=scenario.signing_key("root"))
    assert region.handle_root_receipt(refusal).status == "rejected:stale_round"
    region.close()
    reopened = open_region(db="eu.sqlite", device_keys=scenario.device_keys("eu"))
    assert reopened.pending_aggregate() is None
    assert reopened.status().counters["aggregate_rejected:stale_round"] == 1
    # The next round starts normally; an aggregate the root never answered is counted when the region moves on.
    reopened.start_round(1, scenario.initial_model())
    assert "aggregate_unacknowledged" not in reopened.status().counters


def _stale():
    from device_agent.errors import RejectedUpdateError

    return RejectedUpdateError("stale_round", "round 0 is over")


def test_forwarding_root_counts_a_device_reported_by_two_regions_once(
        open_region: Callable[..., RegionalAggregator], tmp_path: Path, clock: scenario.StepClock) -> None:
    shared = scenario.device_updates("eu", count=1)[0]  # re-provisioned into us with the same id and key
    eu = _closed_region(open_region, "eu", devices=scenario.device_updates("eu", count=3))
    us = _closed_region(open_region, "us", devices=[*scenario.device_updates("us", count=2), shared])
    root = _root(tmp_path, clock)
    assert root.handle_aggregate(eu.pending_aggregate() or b"", topic_region="eu").verdict is Verdict.ACCEPTED
    refused = root.handle_aggregate(us.pending_aggregate() or b"", topic_region="us")
    assert (refused.verdict, refused.reason) == (Verdict.REJECTED, "device_overlap")
    assert shared.device in refused.detail and "counted by eu" in refused.detail
    assert root.handle_aggregate(eu.pending_aggregate() or b"", topic_region="eu").verdict is Verdict.DUPLICATE
    assert refused.receipt is not None
    assert us.handle_root_receipt(refused.receipt).status == "rejected:device_overlap"
    assert us.pending_aggregate() is None
    clock.advance(601)  # us will not report: the root closes at its deadline, eu alone, each device once
    assert root.should_close()
    root.close_round()
    assert root.status().counters["regions_missing"] == 1
    root.close()


def test_forwarding_root_closes_empty_at_its_deadline(tmp_path: Path, clock: scenario.StepClock) -> None:
    root = _root(tmp_path, clock)
    assert not root.should_close()
    clock.advance(599)
    assert not root.should_close()
    clock.advance(2)
    assert root.should_close()  # nothing arrived, and the root moves on anyway
    blob = root.close_round()
    from device_agent.protocol.envelope import open_model

    model = open_model(blob, trusted_signers=scenario.signing_key("root").public_key())
    assert model.header.round == 1
    for name, value in scenario.initial_model().items():
        np.testing.assert_array_equal(model.tensors[name], value)
    assert root.status().counters["regions_missing"] == 2
    root.close()


@pytest.mark.parametrize(("contributors", "reason"), [
    (None, "missing_tensor"),
    (b'[["eu-dev-1",5],["eu-dev-0",5]]', "malformed"),       # not sorted
    (b'[["eu-dev-0",5],["eu-dev-1",4]]', "malformed"),       # weights sum to 9, the header says 10
    (b'[["eu-dev-0", 5],["eu-dev-1",5]]', "malformed"),      # not canonical
    (b'[["eu-dev-0",5.0],["eu-dev-1",5]]', "malformed"),     # not an integer
    (b'{"eu-dev-0":10}', "malformed"),
])
def test_forwarding_root_refuses_an_aggregate_with_a_bad_contributor_list(
        tmp_path: Path, clock: scenario.StepClock, contributors: bytes | None, reason: str) -> None:
    root = _root(tmp_path, clock)
    header = UpdateHeader.create(kind=MessageKind.AGGREGATE, fleet=scenario.FLEET, sender="eu", region="eu", round=0,
                                 bundle_version=scenario.BUNDLE_VERSION, sample_count=10)
    tensors = dict(scenario.device_updates(count=1)[0].delta)
    if contributors is not None:
        tensors[CONTRIBUTORS_TENSOR] = np.frombuffer(contributors, dtype=np.uint8).copy()
    blob = seal_update(header, tensors, recipient_public_key=scenario.encryption_key("root").public_key(),
                       sender_key=scenario.signing_key("eu"))
    handled = root.handle_aggregate(blob, topic_region="eu")
    assert (handled.verdict, handled.reason) == (Verdict.REJECTED, reason)
    good = {**tensors, CONTRIBUTORS_TENSOR: encode_contributors([("eu-dev-0", 4), ("eu-dev-1", 6)])}
    header = UpdateHeader.create(kind=MessageKind.AGGREGATE, fleet=scenario.FLEET, sender="eu", region="eu", round=0,
                                 bundle_version=scenario.BUNDLE_VERSION, sample_count=10)
    blob = seal_update(header, good, recipient_public_key=scenario.encryption_key("root").public_key(),
                       sender_key=scenario.signing_key("eu"))
    assert root.handle_aggregate(blob, topic_region="eu").verdict is Verdict.ACCEPTED
    root.close()
