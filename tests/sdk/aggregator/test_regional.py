"""The regional aggregator with real crypto and a real SQLite file: math, rejections, duplicates, closing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.errors import RejectedUpdateError
from device_agent.protocol.envelope import open_model, open_update
from device_agent.protocol.headers import MessageKind
from device_agent.protocol.receipts import ReceiptStatus, open_receipt
from sdk.aggregation import AggregationConfig, coordinate_median
from sdk.aggregator import (
    CloseReason,
    ModelRejectedError,
    RegionalAggregator,
    RoundPolicy,
    RoundStateError,
    RoundStatus,
    Verdict,
)
from sdk.aggregator.contributors import split_contributors
from tests.sdk.aggregator import scenario

REGION_KEY = scenario.signing_key("eu").public_key()


def _assert_params_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name].dtype == np.float32
        np.testing.assert_array_equal(actual[name], expected[name])


def test_regional_round_of_five_devices_is_the_sample_weighted_mean(region: RegionalAggregator) -> None:
    updates = scenario.device_updates(count=5)
    for update in updates:
        handled = region.handle_update(scenario.seal(update), topic_device=update.device)
        assert handled.verdict is Verdict.ACCEPTED and handled.accepted and handled.reason == ""
        assert handled.receipt is not None
        receipt = open_receipt(handled.receipt, trusted_signers=REGION_KEY)
        assert receipt.status is ReceiptStatus.ACCEPTED and receipt.device == update.device and receipt.update_nonce == update.nonce
    status = region.status()
    assert (status.accepted, status.samples, status.close_reason) == (5, sum(u.samples for u in updates), CloseReason.QUORUM)

    aggregate = region.close_round()
    expected = scenario.reference_mean(updates)
    assert aggregate.mean_delta is not None
    for name in expected:
        np.testing.assert_allclose(aggregate.mean_delta[name], expected[name], rtol=1e-6, atol=1e-7)
    assert (aggregate.round, aggregate.update_count, aggregate.sample_count) == (0, 5, sum(u.samples for u in updates))
    base = scenario.initial_model()
    for name in base:
        np.testing.assert_allclose(aggregate.regional_params[name], base[name] + expected[name], rtol=1e-6, atol=1e-6)

    # The aggregate is sealed for the root and signed by the region.
    assert aggregate.blob is not None
    opened = open_update(aggregate.blob, recipient_key=scenario.encryption_key("root"), sender_public_key={"eu": REGION_KEY})
    assert opened.header.kind is MessageKind.AGGREGATE and opened.header.region == "eu"
    assert opened.header.sample_count == aggregate.sample_count
    tensors, contributors = split_contributors(opened)
    _assert_params_equal(tensors.tensors, aggregate.mean_delta)
    # The root learns which devices the region counted, and with which weight (inside the encrypted payload).
    assert contributors == tuple(sorted((u.device, u.samples) for u in updates))
    assert region.status().status is RoundStatus.CLOSED


Build = Callable[[list[scenario.DeviceUpdate], int], bytes]


def _bad_inputs() -> dict[str, tuple[Build, str, bool]]:
    """name -> (build the bad blob from the good updates for round r, expected reason, whether a receipt comes back)."""
    nan = {name: np.full(shape, np.nan, dtype=np.float32) for name, (shape, _) in scenario.SPEC.items()}
    inf = {name: np.full(shape, np.inf, dtype=np.float32) for name, (shape, _) in scenario.SPEC.items()}
    huge = {name: np.full(shape, 100.0, dtype=np.float32) for name, (shape, _) in scenario.SPEC.items()}
    wrong_shape = {"base.0.weight": np.zeros((3, 4), dtype=np.float32), "base.0.bias": np.zeros(4, dtype=np.float32)}
    missing = {"base.0.weight": np.zeros((4, 3), dtype=np.float32)}
    stranger = scenario.DeviceUpdate(device="intruder", delta={}, samples=1, nonce=b"\x09" * 16)
    other_recipient = X25519PrivateKey.generate().public_key()
    eu_key = scenario.encryption_key("eu").public_key()
    seal = scenario.seal
    return {
        "forged_signature": (lambda u, r: seal(u[5], round=r, key=scenario.signing_key(u[0].device)), "auth", False),
        "unknown_device": (lambda u, r: seal(stranger, round=r, delta=u[0].delta, key=scenario.signing_key("intruder")), "auth", False),
        "wrong_recipient_key": (lambda u, r: seal(u[5], round=r, recipient=other_recipient), "auth", False),
        "truncated_tail": (lambda u, r: seal(u[5], round=r)[:-10], "auth", False),
        "truncated_header": (lambda u, r: seal(u[5], round=r)[:40], "malformed", False),
        "garbage": (lambda u, r: b"\x00garbage" * 20, "malformed", False),
        "empty": (lambda u, r: b"", "malformed", False),
        "replayed_blob_of_last_round": (lambda u, r: seal(u[5], round=r - 1), "stale_round", True),
        "future_round": (lambda u, r: seal(u[5], round=r + 1), "future_round", True),
        "wrong_shapes": (lambda u, r: seal(u[5], round=r, delta=wrong_shape), "shape", True),
        "missing_tensor": (lambda u, r: seal(u[5], round=r, delta=missing), "missing_tensor", True),
        "nan": (lambda u, r: seal(u[5], round=r, delta=nan), "non_finite", True),
        "inf": (lambda u, r: seal(u[5], round=r, delta=inf), "non_finite", True),
        "norm_above_bound": (lambda u, r: seal(u[5], round=r, delta=huge), "norm", True),
        "bundle_version": (lambda u, r: seal(u[5], round=r, bundle_version=2), "wrong_bundle_version", True),
        "other_region": (lambda u, r: seal(u[5], round=r, region="us", recipient=eu_key), "region", True),
        "aggregate_kind": (lambda u, r: seal(u[5], round=r, kind=MessageKind.AGGREGATE), "kind", True),
        "zero_samples": (lambda u, r: seal(u[5], round=r, sample_count=0), "sample_count", True),
        "same_nonce_other_content": (lambda u, r: seal(u[0], round=r, delta=u[1].delta), "replay", True),
        "second_update_same_round": (lambda u, r: seal(u[0], round=r, nonce=b"\x05" * 16), "already_counted", True),
    }


BAD = _bad_inputs()


@pytest.fixture
def region_in_round_1(region: RegionalAggregator) -> tuple[RegionalAggregator, list[scenario.DeviceUpdate]]:
    """The eu region after an empty round 0, collecting round 1 with devices 0 and 1 accepted (5 is the bad one)."""
    region.start_round(1, scenario.initial_model(seed=8))
    updates = scenario.device_updates(count=6)
    for update in updates[:2]:
        assert region.handle_update(scenario.seal(update, round=1)).verdict is Verdict.ACCEPTED
    return region, updates


@pytest.mark.parametrize("case", sorted(BAD))
def test_regional_rejects_bad_input_with_its_reason(case: str, region_in_round_1: tuple[RegionalAggregator, Any]) -> None:
    region, updates = region_in_round_1
    build, reason, answered = BAD[case]
    handled = region.handle_update(build(updates, 1))
    assert (handled.verdict, handled.reason) == (Verdict.REJECTED, reason)
    assert region.status().rejections() == {reason: 1}
    if reason == "auth":
        assert handled.detail == "" and handled.header is None
    if answered:
        assert handled.receipt is not None
        receipt = open_receipt(handled.receipt, trusted_signers=REGION_KEY)
        assert receipt.status is ReceiptStatus.REJECTED and receipt.reason == reason
    else:
        assert handled.receipt is None
    assert region.status().accepted == 2


def test_regional_round_completes_with_the_good_updates_among_bad_ones(region_in_round_1: tuple[RegionalAggregator, Any]) -> None:
    region, updates = region_in_round_1
    for build, _, _ in BAD.values():
        region.handle_update(build(updates, 1))
    for update in updates[2:5]:
        assert region.handle_update(scenario.seal(update, round=1)).verdict is Verdict.ACCEPTED
    expected_counts: dict[str, int] = {}
    for _, reason, _ in BAD.values():
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert region.status().rejections() == expected_counts
    aggregate = region.close_round()
    assert aggregate.update_count == 5
    assert aggregate.mean_delta is not None
    expected = scenario.reference_mean(updates[:5])
    for name in expected:
        np.testing.assert_allclose(aggregate.mean_delta[name], expected[name], rtol=1e-6, atol=1e-7)


def test_regional_duplicate_is_acknowledged_but_counted_once(region: RegionalAggregator) -> None:
    updates = scenario.device_updates(count=3)
    first = scenario.seal(updates[0])
    assert region.handle_update(first).verdict is Verdict.ACCEPTED
    resealed = scenario.seal(updates[0])  # a retry: same header and delta, fresh ephemeral key, other bytes
    assert resealed != first
    for blob in (first, resealed):
        handled = region.handle_update(blob)
        assert handled.verdict is Verdict.DUPLICATE and handled.accepted and handled.receipt is not None
        assert open_receipt(handled.receipt, trusted_signers=REGION_KEY).status is ReceiptStatus.ACCEPTED
    region.handle_update(scenario.seal(updates[1]))
    status = region.status()
    assert (status.accepted, status.samples) == (2, updates[0].samples + updates[1].samples)
    assert status.counters.get("duplicate") == 2 and status.rejections() == {}
    aggregate = region.close_round()
    assert aggregate.mean_delta is not None
    expected = scenario.reference_mean(updates[:2])
    for name in expected:
        np.testing.assert_allclose(aggregate.mean_delta[name], expected[name], rtol=1e-6, atol=1e-7)
    # After the close, a resend is still acknowledged (it was counted); a new update is late.
    assert region.handle_update(scenario.seal(updates[0])).verdict is Verdict.DUPLICATE
    late = region.handle_update(scenario.seal(updates[2]))
    assert (late.verdict, late.reason) == (Verdict.REJECTED, "stale_round")


def test_regional_close_is_idempotent_and_empty_rounds_forward_nothing(region: RegionalAggregator) -> None:
    region.handle_update(scenario.seal(scenario.device_updates(count=1)[0]))
    first = region.close_round()
    again = region.close_round()
    assert again.blob == first.blob and again.sample_count == first.sample_count
    region.start_round(1, scenario.initial_model())
    empty = region.close_round()
    assert (empty.mean_delta, empty.blob, empty.update_count, empty.sample_count) == (None, None, 0, 0)
    _assert_params_equal(empty.regional_params, region_model_of(region, round=1))


def region_model_of(region: RegionalAggregator, *, round: int) -> dict[str, np.ndarray]:
    """The model the region serves for ``round`` (S_r), verified as a device would."""
    blob = region.current_model()
    assert blob is not None
    opened = open_model(blob, trusted_signers=[scenario.signing_key("root").public_key(), REGION_KEY])
    assert opened.header.round == round and opened.header.region == "eu"
    return opened.tensors


def test_regional_closes_at_quorum_or_deadline_on_the_injected_clock(
    open_region: Callable[..., RegionalAggregator], clock: scenario.StepClock
) -> None:
    region = open_region(policy=RoundPolicy(quorum=3, deadline_s=30.0, min_updates=2))
    assert region.close_reason() is None  # no round yet
    region.start_round(0, scenario.initial_model())
    updates = scenario.device_updates(count=3)
    region.handle_update(scenario.seal(updates[0]))
    clock.advance(31.0)
    assert not region.should_close()  # past the deadline but below min_updates
    region.handle_update(scenario.seal(updates[1]))
    assert region.close_reason() is CloseReason.DEADLINE
    region.handle_update(scenario.seal(updates[2]))
    assert region.close_reason() is CloseReason.QUORUM


def test_regional_median_rule(open_region: Callable[..., RegionalAggregator]) -> None:
    region = open_region(aggregation=AggregationConfig(rule="median"))
    region.start_round(0, scenario.initial_model())
    updates = scenario.device_updates(count=5)
    for update in updates:
        assert region.handle_update(scenario.seal(update)).accepted
    aggregate = region.close_round()
    assert aggregate.mean_delta is not None
    expected = coordinate_median([u.delta for u in updates])
    assert expected is not None
    _assert_params_equal(aggregate.mean_delta, expected)
    assert aggregate.sample_count == sum(u.samples for u in updates)


def test_regional_refuses_models_not_from_the_root(region: RegionalAggregator) -> None:
    from device_agent.protocol.envelope import sign_model
    from device_agent.protocol.headers import ModelHeader

    def model(round: int, *, key: str = "root", **fields: Any) -> bytes:
        header = ModelHeader(
            fleet=fields.pop("fleet", scenario.FLEET),
            sender="root",
            round=round,
            bundle_version=fields.pop("bundle_version", scenario.BUNDLE_VERSION),
            region=fields.pop("region", None),
            nonce=b"\x01" * 16,
            timestamp_ms=1,
        )
        return sign_model(header, fields.pop("params", scenario.initial_model()), signer_key=scenario.signing_key(key))

    cases = {
        "auth": model(1, key="eu"),
        "malformed": model(1)[:30],
        "fleet": model(1, fleet="other"),
        "region": model(1, region="eu"),
        "bundle_version": model(1, bundle_version=9),
        "params": model(1, params={"base.0.weight": np.zeros((4, 3), dtype=np.float32)}),
    }
    for reason, blob in cases.items():
        with pytest.raises(ModelRejectedError) as refused:
            region.handle_root_model(blob)
        assert refused.value.reason == reason
        if reason == "auth":
            assert str(refused.value) == "auth"
    served = region.handle_root_model(model(1))
    assert region.handle_root_model(model(1)) == served  # a redelivered retained model: same answer
    with pytest.raises(ModelRejectedError) as stale:
        region.handle_root_model(model(0))
    assert stale.value.reason == "stale_round"
    counters = region.status().counters
    assert {name: counters[f"model_rejected:{name}"] for name in [*cases, "stale_round"]} == dict.fromkeys([*cases, "stale_round"], 1)


def test_regional_newer_round_abandons_the_open_one(region: RegionalAggregator) -> None:
    for update in scenario.device_updates(count=2):
        region.handle_update(scenario.seal(update))
    region.start_round(1, scenario.initial_model(seed=9))
    status = region.status()
    assert (status.round, status.status, status.accepted) == (1, RoundStatus.COLLECTING, 0)
    assert status.counters["abandoned_updates"] == 2


def test_regional_refuses_phases_before_the_first_round(open_region: Callable[..., RegionalAggregator]) -> None:
    region = open_region()
    handled = region.handle_update(scenario.seal(scenario.device_updates(count=1)[0]))
    assert (handled.verdict, handled.reason) == (Verdict.REJECTED, "no_round")
    with pytest.raises(RoundStateError):
        region.close_round()
    with pytest.raises(ValueError):
        region.start_round(0, {"base.0.weight": np.zeros((4, 3), dtype=np.float32)})
    assert region.current_model() is None


def test_rejected_update_error_reasons_fit_receipts() -> None:
    # Every reason the intake can give must be a valid receipt reason code.
    from device_agent.protocol.receipts import Receipt
    from device_agent.protocol.validation import RejectReason
    from sdk.aggregator import IntakeReason

    header_fields = dict(fleet="demo", issuer="eu", device="d", round=0, update_nonce=b"\x00" * 16, timestamp_ms=0)
    for reason in [*RejectReason, *IntakeReason]:
        Receipt(status=ReceiptStatus.REJECTED, reason=RejectedUpdateError(reason.value).reason, **header_fields)  # type: ignore[arg-type]


def test_regional_exact_resend_is_acknowledged_in_its_round_and_stale_once_the_next_round_started(
        region: RegionalAggregator) -> None:
    """docs/protocol.md, "Rounds, resends and replays": a resend after a lost receipt is answered "accepted" while its
    round is current (collecting or closed); once the next round has started, the same bytes are stale_round."""
    updates = scenario.device_updates(count=2)
    blob = scenario.seal(updates[0])
    assert region.handle_update(blob).verdict is Verdict.ACCEPTED
    region.close_round()
    again = region.handle_update(blob)  # round 0 closed, round 1 not started: still round 0's answer
    assert again.verdict is Verdict.DUPLICATE and again.receipt is not None
    assert open_receipt(again.receipt, trusted_signers=REGION_KEY).status is ReceiptStatus.ACCEPTED
    region.start_round(1, scenario.initial_model())
    replayed = region.handle_update(blob)
    assert (replayed.verdict, replayed.reason) == (Verdict.REJECTED, "stale_round")
    assert replayed.receipt is not None
    receipt = open_receipt(replayed.receipt, trusted_signers=REGION_KEY)
    assert (receipt.status, receipt.reason, receipt.round) == (ReceiptStatus.REJECTED, "stale_round", 0)
    assert region.status().accepted == 0
    never_accepted = region.handle_update(scenario.seal(updates[1]))
    assert (never_accepted.verdict, never_accepted.reason) == (Verdict.REJECTED, "stale_round")
    assert region.status().rejections()["stale_round"] == 2
