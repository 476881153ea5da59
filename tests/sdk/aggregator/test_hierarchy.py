"""Root and regions together: combining by sample count, mixing weights, and several processes sharing a region."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device_agent.protocol.envelope import open_model, seal_update
from device_agent.protocol.headers import MessageKind, UpdateHeader
from sdk.aggregator import RegionalAggregate, RegionalAggregator, RootAggregator, Verdict
from tests.sdk.aggregator import scenario

ROOT_KEY = scenario.signing_key("root").public_key()


def _run_region(region: RegionalAggregator, name: str, count: int, seed: int, round: int = 0) -> tuple[RegionalAggregate, list[scenario.DeviceUpdate]]:
    updates = scenario.device_updates(name, count, seed=seed)
    for update in updates:
        assert region.handle_update(scenario.seal(update, region=name, round=round), topic_device=update.device).accepted
    return region.close_round(), updates


def _open_root(tmp_path: Path, name: str = "root.sqlite", **overrides: object) -> RootAggregator:
    return RootAggregator.open(tmp_path / name, scenario.root_config(**overrides))  # type: ignore[arg-type]


def _global(blob: bytes, round: int) -> dict[str, np.ndarray]:
    opened = open_model(blob, trusted_signers=ROOT_KEY)
    assert (opened.header.round, opened.header.region) == (round, None)
    return opened.tensors


def test_root_combines_two_regions_by_sample_count(tmp_path: Path, open_region: Callable[..., RegionalAggregator]) -> None:
    root = _open_root(tmp_path)
    g0 = scenario.initial_model()
    g0_blob = root.start_round(0, g0)
    eu, us = open_region("eu"), open_region("us", policy=scenario.RoundPolicy(quorum=3, deadline_s=60.0))
    for region in (eu, us):
        served = open_model(region.handle_root_model(g0_blob), trusted_signers=[ROOT_KEY, scenario.signing_key(region.identity).public_key()])
        assert served.header.region == region.identity
        for name in g0:
            assert served.tensors[name].tobytes() == g0[name].tobytes()  # regional_weight 0: S_0 = G_0
    eu_aggregate, eu_updates = _run_region(eu, "eu", 5, seed=1)
    us_aggregate, us_updates = _run_region(us, "us", 3, seed=2)

    for name, aggregate in (("eu", eu_aggregate), ("us", us_aggregate)):
        assert aggregate.blob is not None
        assert root.handle_aggregate(aggregate.blob, topic_region=name).verdict is Verdict.ACCEPTED
    assert root.should_close()
    g1_blob = root.close_round()
    g1 = _global(g1_blob, round=1)

    flat = scenario.reference_mean(eu_updates + us_updates)  # one FedAvg over all eight devices
    assert eu_aggregate.mean_delta is not None and us_aggregate.mean_delta is not None
    n_eu, n_us = eu_aggregate.sample_count, us_aggregate.sample_count
    for name in g0:
        combined = (n_eu * eu_aggregate.mean_delta[name].astype(np.float64) + n_us * us_aggregate.mean_delta[name]) / (n_eu + n_us)
        np.testing.assert_allclose(g1[name], g0[name] + combined, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(g1[name], g0[name] + flat[name], rtol=1e-5, atol=1e-6)
    status = root.status()
    assert (status.round, status.accepted) == (1, 0)
    assert root.current_model() == g1_blob

    # The next round reaches the devices through their region, which starts round 1.
    s1 = open_model(eu.handle_root_model(g1_blob), trusted_signers=[ROOT_KEY, scenario.signing_key("eu").public_key()])
    assert s1.header.round == 1 and all(s1.tensors[name].tobytes() == g1[name].tobytes() for name in g1)
    root.close()


def test_root_uniform_weighting_counts_each_region_once(tmp_path: Path, open_region: Callable[..., RegionalAggregator]) -> None:
    root = _open_root(tmp_path, weighting="uniform")
    g0 = scenario.initial_model()
    g0_blob = root.start_round(0, g0)
    aggregates = []
    for name, count, seed in (("eu", 5, 1), ("us", 2, 2)):
        region = open_region(name, policy=scenario.RoundPolicy(quorum=count, deadline_s=60.0))
        region.handle_root_model(g0_blob)
        aggregates.append(_run_region(region, name, count, seed)[0])
    for aggregate in aggregates:
        assert aggregate.blob is not None and root.handle_aggregate(aggregate.blob).accepted
    g1 = _global(root.close_round(), round=1)
    for name in g0:
        deltas = [a.mean_delta[name].astype(np.float64) for a in aggregates if a.mean_delta is not None]
        np.testing.assert_allclose(g1[name], g0[name] + (deltas[0] + deltas[1]) / 2, rtol=1e-6, atol=1e-6)
    root.close()


def test_root_counts_a_resent_aggregate_once_across_a_restart(tmp_path: Path, open_region: Callable[..., RegionalAggregator]) -> None:
    root = _open_root(tmp_path)
    g0_blob = root.start_round(0, scenario.initial_model())
    eu, us = open_region("eu"), open_region("us")
    for region in (eu, us):
        region.handle_root_model(g0_blob)
    eu_aggregate, _ = _run_region(eu, "eu", 5, seed=1)
    us_aggregate, _ = _run_region(us, "us", 5, seed=2)
    assert eu_aggregate.blob is not None and us_aggregate.blob is not None
    assert root.handle_aggregate(eu_aggregate.blob).verdict is Verdict.ACCEPTED
    del root  # crash

    root = _open_root(tmp_path)
    resent = eu.close_round()  # the region, restarted too, hands back the very same sealed bytes
    assert resent.blob == eu_aggregate.blob
    assert root.handle_aggregate(resent.blob).verdict is Verdict.DUPLICATE
    assert root.handle_aggregate(us_aggregate.blob).verdict is Verdict.ACCEPTED
    g1 = _global(root.close_round(), round=1)

    reference = _open_root(tmp_path, "reference.sqlite")
    reference.start_round(0, scenario.initial_model())
    for blob in (eu_aggregate.blob, us_aggregate.blob):
        reference.handle_aggregate(blob)
    expected = _global(reference.close_round(), round=1)
    assert all(g1[name].tobytes() == expected[name].tobytes() for name in expected)
    root.close()
    reference.close()


def test_root_rejects_aggregates_that_are_not_a_regions_own(tmp_path: Path) -> None:
    root = _open_root(tmp_path)
    root.start_round(0, scenario.initial_model())
    delta = scenario.device_updates(count=1)[0].delta

    def aggregate(*, sender: str, region: str, kind: MessageKind = MessageKind.AGGREGATE, key: str | None = None) -> bytes:
        header = UpdateHeader(
            kind=kind, fleet=scenario.FLEET, sender=sender, region=region, round=0, bundle_version=scenario.BUNDLE_VERSION,
            sample_count=10, nonce=scenario.random_nonce(), timestamp_ms=1,
        )
        return seal_update(header, delta, recipient_public_key=scenario.encryption_key("root").public_key(), sender_key=scenario.signing_key(key or sender))

    cases = {
        "region": aggregate(sender="eu", region="us"),
        "auth": aggregate(sender="asia", region="asia"),
        "kind": aggregate(sender="eu", region="eu", kind=MessageKind.UPDATE),
    }
    for reason, blob in cases.items():
        assert root.handle_aggregate(blob).reason == reason
    assert root.handle_aggregate(aggregate(sender="eu", region="eu"), topic_region="us").reason == "auth"
    assert root.status().rejections() == {"region": 1, "auth": 2, "kind": 1}
    root.close()


@pytest.mark.parametrize("weight", [0.0, 1.0, 0.25])
def test_regional_mixing_weight(weight: float, open_region: Callable[..., RegionalAggregator]) -> None:
    region = open_region(regional_weight=weight)
    g0 = scenario.initial_model()
    s0 = scenario.initial_model()  # what the region serves in round 0: G_0 whatever the weight (no R yet)
    served_0 = open_model(region.start_round(0, g0), trusted_signers=scenario.signing_key("eu").public_key())
    assert all(served_0.tensors[name].tobytes() == s0[name].tobytes() for name in s0)
    aggregate, _ = _run_region(region, "eu", 5, seed=4)
    r0 = aggregate.regional_params
    region.close()
    region = open_region(regional_weight=weight)  # R_0 survives a restart

    g1 = scenario.initial_model(seed=11)
    s1 = open_model(region.start_round(1, g1), trusted_signers=scenario.signing_key("eu").public_key()).tensors
    for name in g1:
        if weight == 0.0:
            assert s1[name].tobytes() == g1[name].tobytes()  # plain hierarchical FedAvg
        elif weight == 1.0:
            assert s1[name].tobytes() == r0[name].tobytes()  # the region keeps its own model
        else:
            np.testing.assert_allclose(s1[name], weight * r0[name].astype(np.float64) + (1 - weight) * g1[name], rtol=1e-6, atol=1e-7)


def test_two_processes_share_a_region_and_count_each_update_once(open_region: Callable[..., RegionalAggregator]) -> None:
    a = open_region(member="a", db="eu.sqlite")
    b = open_region(member="b", db="eu.sqlite")
    a.start_round(0, scenario.initial_model())
    updates = scenario.device_updates(count=6)
    for i, update in enumerate(updates[:5]):  # the broker's shared subscription alternates between members
        assert (a, b)[i % 2].handle_update(scenario.seal(update)).verdict is Verdict.ACCEPTED
    # A device that got no receipt from member a resends; the broker hands it to member b.
    assert b.handle_update(scenario.seal(updates[0])).verdict is Verdict.DUPLICATE
    assert b.status().accepted == 5 and a.should_close()

    closed_by_b = b.close_round()
    late = a.handle_update(scenario.seal(updates[5]))
    assert (late.verdict, late.reason) == (Verdict.REJECTED, "stale_round")
    assert a.close_round().blob == closed_by_b.blob  # whoever asks gets the one aggregate
    assert closed_by_b.update_count == 5 and closed_by_b.mean_delta is not None
    expected = scenario.reference_mean(updates[:5])
    for name in expected:
        np.testing.assert_allclose(closed_by_b.mean_delta[name], expected[name], rtol=1e-6, atol=1e-7)
