"""Three levels in one process: root <- middle tier ``eu`` <- cells ``eu-a``, ``eu-b``; root <- region ``us`` (two levels).

The stores are real SQLite files; keys, envelopes and receipts are real. The
global model must be the flat sample-weighted mean over every device, the
middle tier's intake exactly-once, its contributor list the union of its
children's, and a device counted in two branches refused where they meet.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.protocol.envelope import open_model, open_update
from device_agent.protocol.receipts import ReceiptStatus, open_receipt
from device_agent.protocol.tensor_codec import DecodeLimits
from sdk.aggregation import mix_regional
from sdk.aggregation.influence import InfluencePolicy
from sdk.aggregator import (
    MiddleAggregator,
    MiddleConfig,
    ModelRejectedError,
    RegionalAggregator,
    RootAggregator,
    RoundPolicy,
    Verdict,
)
from sdk.aggregator.contributors import split_contributors
from tests.sdk.aggregator import scenario

CELLS = ("eu-a", "eu-b")
ROOT_KEY = scenario.signing_key("root").public_key()


def middle_config(name: str = "eu", children: tuple[str, ...] = CELLS, **overrides: Any) -> MiddleConfig:
    """Middle tier ``name`` under the root, trusting ``children``: quorum = number of children."""
    values: dict[str, Any] = dict(
        fleet=scenario.FLEET, region=name, encryption_key=scenario.encryption_key(name),
        signing_key=scenario.signing_key(name),
        device_keys={child: scenario.signing_key(child).public_key() for child in children},
        root_verify_key=ROOT_KEY, root_encryption_key=scenario.encryption_key("root").public_key(),
        spec=scenario.SPEC, bundle_version=scenario.BUNDLE_VERSION,
        policy=RoundPolicy(quorum=len(children), deadline_s=60.0), norm_bound=scenario.NORM_BOUND,
        wall_clock=lambda: 1_700_000_000.0,
    )
    values.update(overrides)
    return MiddleConfig(**values)


class Tree:
    """The stores of one test, opened on tmp_path; closed at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path
        self.opened: list[Any] = []
        self.root = self._keep(RootAggregator.open(tmp_path / "root.sqlite", scenario.root_config(("eu", "us"))))
        self.eu = self.open_middle()
        self.cells = {cell: self.open_cell(cell) for cell in CELLS}
        self.us = self._keep(RegionalAggregator.open(tmp_path / "us.sqlite", scenario.regional_config("us",
                                                     policy=RoundPolicy(quorum=2, deadline_s=60.0))))

    def _keep(self, aggregator: Any) -> Any:
        self.opened.append(aggregator)
        return aggregator

    def open_middle(self, **overrides: Any) -> MiddleAggregator:
        return self._keep(MiddleAggregator.open(self.path / "eu.sqlite", middle_config(**overrides)))

    def open_cell(self, cell: str, *, db: str | None = None, **overrides: Any) -> RegionalAggregator:
        values: dict[str, Any] = dict(device_keys=scenario.device_keys(cell), parent="eu",
                                      root_verify_key=scenario.signing_key("eu").public_key(),
                                      root_encryption_key=scenario.encryption_key("eu").public_key(),
                                      policy=RoundPolicy(quorum=3, deadline_s=60.0))
        config = scenario.regional_config(cell, **{**values, **overrides})
        return self._keep(RegionalAggregator.open(self.path / (db or f"{cell}.sqlite"), config))

    def start(self, round: int, model: dict[str, np.ndarray] | None = None) -> None:
        """Round ``round`` from the root down to every cell (G_0 = the scenario's model when ``model`` is None)."""
        blob = self.root.start_round(0, scenario.initial_model()) if model is None else self.root.current_model()
        assert blob is not None
        self.flow_down(blob)

    def flow_down(self, global_blob: bytes) -> dict[str, bytes]:
        """The root's model through every tier: what each tier serves below it."""
        served = {"eu": self.eu.handle_root_model(global_blob), "us": self.us.handle_root_model(global_blob)}
        for cell, aggregator in self.cells.items():
            served[cell] = aggregator.handle_root_model(served["eu"])
        return served


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    made = Tree(tmp_path)
    yield made
    for aggregator in made.opened:
        aggregator.close()


def _devices(tree: Tree, round: int, seed: int) -> dict[str, list[scenario.DeviceUpdate]]:
    """Three devices per cell and two in ``us``, each counted by its leaf tier."""
    updates = {name: scenario.device_updates(name, 3 if name in CELLS else 2, seed=seed + i)
               for i, name in enumerate((*CELLS, "us"))}
    leaves: dict[str, RegionalAggregator] = {**tree.cells, "us": tree.us}
    for name, batch in updates.items():
        for update in batch:
            assert leaves[name].handle_update(scenario.seal(update, region=name, round=round), topic_device=update.device).accepted
    return updates


def _close_upwards(tree: Tree) -> bytes:
    """Cells -> eu -> root, us -> root; the root's next global model."""
    for cell, aggregator in tree.cells.items():
        assert aggregator.should_close()
        blob = aggregator.close_round().blob
        assert blob is not None
        handled = tree.eu.handle_aggregate(blob, topic_child=cell)
        assert handled.verdict is Verdict.ACCEPTED, handled.reason
        assert aggregator.handle_root_receipt(handled.receipt).status == "accepted"
    assert tree.eu.should_close()
    for name, tier in (("eu", tree.eu), ("us", tree.us)):
        blob = tier.close_round().blob
        assert blob is not None
        handled = tree.root.handle_aggregate(blob, topic_region=name)
        assert handled.verdict is Verdict.ACCEPTED, handled.reason
        assert tier.handle_root_receipt(handled.receipt).status == "accepted"
    assert tree.root.should_close()
    return tree.root.close_round()


def test_three_levels_give_the_flat_sample_weighted_mean_and_the_model_flows_down(tree: Tree) -> None:
    tree.start(0)
    g0 = scenario.initial_model()
    updates = _devices(tree, 0, seed=10)
    g1_blob = _close_upwards(tree)
    g1 = open_model(g1_blob, trusted_signers=ROOT_KEY)
    assert g1.header.round == 1
    flat = scenario.reference_mean([u for batch in updates.values() for u in batch])
    for name in g0:
        np.testing.assert_allclose(g1.tensors[name], g0[name] + flat[name], atol=1e-6, rtol=0)

    # Round 1 flows down through every level: regional_weight 0 everywhere, so every tier serves exactly G_1.
    served = tree.flow_down(g1_blob)
    for tier, blob in served.items():
        model = open_model(blob, trusted_signers=scenario.signing_key(tier).public_key())
        assert (model.header.round, model.header.region) == (1, tier)
        for name in g0:
            assert model.tensors[name].tobytes() == g1.tensors[name].tobytes()


def test_the_middle_tiers_aggregate_lists_every_device_of_its_cells_with_its_weight(tree: Tree) -> None:
    tree.start(0)
    updates = _devices(tree, 0, seed=20)
    for cell, aggregator in tree.cells.items():
        blob = aggregator.close_round().blob
        assert blob is not None and tree.eu.handle_aggregate(blob, topic_child=cell).accepted
    aggregate = tree.eu.close_round()
    assert aggregate.blob is not None
    opened = open_update(aggregate.blob, recipient_key=scenario.encryption_key("root"),
                         sender_public_key={"eu": scenario.signing_key("eu").public_key()},
                         limits=DecodeLimits(max_tensors=8, max_total_bytes=1 << 20))
    _, contributors = split_contributors(opened)
    expected = sorted((u.device, u.samples) for cell in CELLS for u in updates[cell])
    assert list(contributors) == expected
    assert opened.header.sample_count == sum(n for _, n in expected) == aggregate.sample_count
    assert opened.header.sender == opened.header.region == "eu"


def test_a_childs_resend_is_a_duplicate_and_a_restarted_middle_resends_the_same_bytes(tree: Tree) -> None:
    tree.start(0)
    _devices(tree, 0, seed=30)
    blobs = {cell: aggregator.close_round().blob for cell, aggregator in tree.cells.items()}
    first = tree.eu.handle_aggregate(blobs["eu-a"], topic_child="eu-a")
    again = tree.eu.handle_aggregate(blobs["eu-a"], topic_child="eu-a")
    assert (first.verdict, again.verdict) == (Verdict.ACCEPTED, Verdict.DUPLICATE)
    receipt = open_receipt(again.receipt, trusted_signers=scenario.signing_key("eu").public_key())
    assert (receipt.device, receipt.status) == ("eu-a", ReceiptStatus.ACCEPTED)
    assert tree.eu.status().accepted == 1 and tree.eu.status().counters["duplicate"] == 1
    assert tree.eu.handle_aggregate(blobs["eu-b"], topic_child="eu-b").accepted
    closed = tree.eu.close_round()

    tree.eu.close()  # a crash after the close: the new process finds the aggregate unanswered
    restarted = tree.open_middle()
    assert restarted.pending_aggregate() == closed.blob
    assert restarted.close_round().blob == closed.blob
    handled = tree.root.handle_aggregate(closed.blob, topic_region="eu")
    assert handled.accepted and tree.root.handle_aggregate(closed.blob, topic_region="eu").verdict is Verdict.DUPLICATE
    assert restarted.handle_root_receipt(handled.receipt).status == "accepted"
    assert restarted.pending_aggregate() is None


def test_a_device_counted_by_two_cells_is_refused_at_their_middle_tier(tmp_path: Path, tree: Tree) -> None:
    moved = scenario.device_id("eu-a", 0)
    tree.cells["eu-b"] = tree.open_cell("eu-b", db="eu-b2.sqlite", device_keys={**scenario.device_keys("eu-b"),
                                                                        moved: scenario.signing_key(moved).public_key()})
    tree.start(0)
    updates = _devices(tree, 0, seed=40)
    twin = next(u for u in updates["eu-a"] if u.device == moved)
    assert tree.cells["eu-b"].handle_update(scenario.seal(twin, region="eu-b"), topic_device=moved).accepted
    blobs = {cell: aggregator.close_round().blob for cell, aggregator in tree.cells.items()}
    assert tree.eu.handle_aggregate(blobs["eu-a"], topic_child="eu-a").accepted
    refused = tree.eu.handle_aggregate(blobs["eu-b"], topic_child="eu-b")
    assert (refused.verdict, refused.reason) == (Verdict.REJECTED, "device_overlap")
    assert tree.cells["eu-b"].handle_root_receipt(refused.receipt).status == "rejected:device_overlap"


def test_a_device_counted_in_two_branches_is_refused_at_the_root(tree: Tree) -> None:
    moved = scenario.device_id("eu-a", 1)
    tree.us.close()
    tree.us = tree._keep(RegionalAggregator.open(tree.path / "us2.sqlite", scenario.regional_config(
        "us", policy=RoundPolicy(quorum=2, deadline_s=60.0),
        device_keys={**scenario.device_keys("us"), moved: scenario.signing_key(moved).public_key()})))
    tree.start(0)
    updates = _devices(tree, 0, seed=50)
    twin = next(u for u in updates["eu-a"] if u.device == moved)
    assert tree.us.handle_update(scenario.seal(twin, region="us"), topic_device=moved).accepted
    for cell, aggregator in tree.cells.items():
        assert tree.eu.handle_aggregate(aggregator.close_round().blob, topic_child=cell).accepted
    assert tree.root.handle_aggregate(tree.eu.close_round().blob, topic_region="eu").accepted
    refused = tree.root.handle_aggregate(tree.us.close_round().blob, topic_region="us")
    assert (refused.verdict, refused.reason) == (Verdict.REJECTED, "device_overlap")


def test_each_tier_takes_only_its_parents_model(tree: Tree) -> None:
    g0_blob = tree.root.start_round(0, scenario.initial_model())
    with pytest.raises(ModelRejectedError) as caught:
        tree.cells["eu-a"].handle_root_model(g0_blob)  # the root's, not eu's: a cell under eu starts from eu's model
    assert caught.value.reason == "auth"  # eu-a trusts eu's key only
    us_model = tree.us.handle_root_model(g0_blob)
    with pytest.raises(ModelRejectedError) as caught:
        tree.eu.handle_root_model(us_model)  # a regional model, signed by a key eu does not trust
    assert caught.value.reason == "auth"
    forged_parent = tree.open_cell("eu-b", db="eu-b2.sqlite", root_verify_key=scenario.signing_key("us").public_key())
    with pytest.raises(ModelRejectedError) as caught:
        forged_parent.handle_root_model(us_model)  # signed by a trusted key, but for region us, not the parent eu
    assert caught.value.reason == "region"


def test_mixing_is_defined_at_every_level(tree: Tree) -> None:
    a = 0.25
    tree.eu.close()
    tree.eu = tree.open_middle(regional_weight=a)
    tree.start(0)
    _devices(tree, 0, seed=60)
    for cell, aggregator in tree.cells.items():
        assert tree.eu.handle_aggregate(aggregator.close_round().blob, topic_child=cell).accepted
    r0 = tree.eu.close_round().regional_params
    assert tree.root.handle_aggregate(tree.eu.close_round().blob, topic_region="eu").accepted
    g1_blob = tree.root.close_round()
    g1 = open_model(g1_blob, trusted_signers=ROOT_KEY).tensors
    served = open_model(tree.eu.handle_root_model(g1_blob), trusted_signers=scenario.signing_key("eu").public_key())
    expected = mix_regional(r0, g1, regional_weight=a)  # S_1 = a R_0 + (1 - a) G_1, at the middle tier too
    for name in g1:
        assert served.tensors[name].tobytes() == expected[name].tobytes()


@pytest.mark.parametrize("overrides, message", [
    (dict(influence=InfluencePolicy(norm="fixed", norm_bound=2.0)), "does not bound influence"),
    (dict(fomo_candidates=2), "FedFomo"),
    (dict(parent="eu"), "its own parent"),
])
def test_middle_config_refuses_what_does_not_apply_to_it(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        middle_config(**overrides)


def test_a_middle_tier_refuses_device_updates(tree: Tree) -> None:
    tree.start(0)
    update = scenario.device_updates("eu", 1, seed=70)[0]
    handled = tree.eu.handle_update(scenario.seal(update, region="eu"), topic_device=update.device)
    assert handled.verdict is Verdict.REJECTED and handled.reason in ("auth", "kind")



def test_two_members_of_a_middle_tier_share_its_store_and_its_contributor_list(tree: Tree) -> None:
    tree.start(0)
    updates = _devices(tree, 0, seed=80)
    other = tree._keep(MiddleAggregator.open(tree.path / "eu.sqlite", middle_config(), member="b"))
    blobs = {cell: aggregator.close_round().blob for cell, aggregator in tree.cells.items()}
    assert tree.eu.handle_aggregate(blobs["eu-a"], topic_child="eu-a").accepted
    assert other.handle_aggregate(blobs["eu-b"], topic_child="eu-b").accepted
    assert other.handle_aggregate(blobs["eu-a"], topic_child="eu-a").verdict is Verdict.DUPLICATE  # the other member's
    assert other.should_close()
    closed = other.close_round()
    assert tree.eu.close_round().blob == closed.blob  # one aggregate, whoever closes
    opened = open_update(closed.blob, recipient_key=scenario.encryption_key("root"),
                         sender_public_key={"eu": scenario.signing_key("eu").public_key()},
                         limits=DecodeLimits(max_tensors=8, max_total_bytes=1 << 20))
    _, contributors = split_contributors(opened)
    assert list(contributors) == sorted((u.device, u.samples) for cell in CELLS for u in updates[cell])
