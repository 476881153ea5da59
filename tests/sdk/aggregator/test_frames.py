"""Prehashed frames (version 2) at the aggregators: exactly-once by the frame digest, mixed versions, announcing, refusing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device_agent.protocol.envelope import open_model
from device_agent.protocol.receipts import ReceiptStatus, open_receipt
from sdk.aggregator import RegionalAggregator, RootAggregator, Verdict
from sdk.aggregator.intake import IntakeReason
from tests.sdk.aggregator import scenario

REGION_KEY = scenario.signing_key("eu").public_key()
ROOT_KEY = scenario.signing_key("root").public_key()


def test_frames_prehashed_resend_is_a_duplicate_and_mixed_versions_fold_alike(region: RegionalAggregator) -> None:
    updates = scenario.device_updates(count=4)
    blobs = [scenario.seal(u, frame_version=2 if i % 2 else 1) for i, u in enumerate(updates)]  # a mixed fleet
    assert [b[4] for b in blobs] == [1, 2, 1, 2]
    for blob in blobs:
        assert region.handle_update(blob).verdict is Verdict.ACCEPTED
    resent = region.handle_update(bytes(blobs[1]))  # the device's pending bytes again (lost receipt)
    assert resent.verdict is Verdict.DUPLICATE and resent.receipt is not None
    assert open_receipt(resent.receipt, trusted_signers=REGION_KEY).status is ReceiptStatus.ACCEPTED
    status = region.status()
    assert status.accepted == 4 and status.counters.get("duplicate") == 1
    aggregate = region.close_round()
    assert aggregate.mean_delta is not None
    expected = scenario.reference_mean(updates)
    for name in expected:
        np.testing.assert_allclose(aggregate.mean_delta[name], expected[name], rtol=1e-6, atol=1e-7)


def test_frames_prehashed_copy_with_the_same_nonce_but_other_bytes_is_counted_once(region: RegionalAggregator) -> None:
    """fedge's senders resend their stored bytes; a copy re-sealed under the same nonce (other ciphertext) is not
    recognised as the same content in version 2: it is answered ``replay`` and still counted once."""
    update = scenario.device_updates(count=1)[0]
    first = scenario.seal(update, frame_version=2)
    assert region.handle_update(first).verdict is Verdict.ACCEPTED
    other_bytes = scenario.seal(update, frame_version=2)
    v1_copy = scenario.seal(update)
    for blob in (other_bytes, v1_copy):
        handled = region.handle_update(blob)
        assert (handled.verdict, handled.reason) == (Verdict.REJECTED, "replay")
    changed = scenario.seal(update, frame_version=2, delta={n: v + 1 for n, v in update.delta.items()})
    assert region.handle_update(changed).reason == "replay"
    assert region.status().accepted == 1


def test_frames_an_aggregator_can_refuse_version_1_and_then_announces_what_it_reads(
        open_region: Callable[..., RegionalAggregator]) -> None:
    with pytest.raises(ValueError, match="announce_frames"):
        scenario.regional_config(update_frames=frozenset({2}))
    region = open_region(update_frames=frozenset({2}), announce_frames=True)
    served = region.start_round(0, scenario.initial_model())
    assert open_model(served, trusted_signers=REGION_KEY).header.frames == (2,)
    update = scenario.device_updates(count=1)[0]
    refused = region.handle_update(scenario.seal(update))
    assert (refused.verdict, refused.reason, refused.receipt) == (Verdict.REJECTED, IntakeReason.MALFORMED.value, None)
    assert "unsupported frame version 1" in refused.detail
    assert region.handle_update(scenario.seal(update, frame_version=2)).verdict is Verdict.ACCEPTED


def test_frames_default_announces_nothing_so_older_devices_still_read_the_model(region: RegionalAggregator) -> None:
    model = region.current_model()
    assert model is not None and b"frames" not in model
    assert open_model(model, trusted_signers=REGION_KEY).header.frames is None


def test_frames_region_seals_its_aggregate_in_the_version_the_root_announces(
        tmp_path: Path, open_region: Callable[..., RegionalAggregator]) -> None:
    blobs = {}
    for announce in (False, True):
        root = RootAggregator.open(tmp_path / f"root-{announce}.sqlite", scenario.root_config(regions=("eu",),
                                                                                              announce_frames=announce))
        g0 = root.start_round(0, scenario.initial_model())
        eu = open_region("eu", db=f"eu-{announce}.sqlite")
        eu.handle_root_model(g0)
        for update in scenario.device_updates(count=5, seed=3):
            assert eu.handle_update(scenario.seal(update)).accepted
        aggregate = eu.close_round()
        assert aggregate.blob is not None
        blobs[announce] = aggregate.blob
        assert root.handle_aggregate(aggregate.blob).verdict is Verdict.ACCEPTED
        assert root.handle_aggregate(aggregate.blob).verdict is Verdict.DUPLICATE  # the region's stored bytes, resent
        blobs[f"global-{announce}"] = root.close_round()
        root.close()
    assert (blobs[False][4], blobs[True][4]) == (1, 2)
    same = [open_model(blobs[f"global-{a}"], trusted_signers=ROOT_KEY).tensors for a in (False, True)]
    assert all(same[0][n].tobytes() == same[1][n].tobytes() for n in same[0])
