"""Both tiers switch bundle versions at a round boundary: carried weights, signed new-version models, and a
signed ``wrong_bundle_version`` rejection (never silence) for what the other version sends."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from device_agent.protocol.envelope import open_model
from device_agent.protocol.receipts import ReceiptStatus, open_receipt
from device_agent.release.carry import carry_parameters
from sdk.aggregator import ModelRejectedError, RegionalAggregator, RootAggregator
from sdk.aggregator.outcomes import Verdict
from sdk.aggregator.root import VersionSwitch
from tests.sdk.aggregator import scenario

# Version 4 keeps base.0.bias (same shape), widens base.0.weight and adds a layer.
SPEC_V4 = {"base.0.weight": ((6, 3), "float32"), "base.0.bias": ((4,), "float32"), "base.1.weight": ((2, 4), "float32")}


def _init_v4() -> dict[str, np.ndarray]:
    return {name: np.full(shape, 0.25, np.float32) for name, (shape, _) in SPEC_V4.items()}


def _carry(old: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return carry_parameters(old, _init_v4()).params


def test_root_switches_at_close_carrying_what_matches(tmp_path: Path) -> None:
    config = scenario.root_config(regions=("eu",), policy=scenario.RoundPolicy(quorum=1, deadline_s=600.0, min_updates=0))
    g0 = scenario.initial_model()
    with RootAggregator.open(tmp_path / "root.sqlite", config) as root:
        root.start_round(0, g0)
        assert root.stored_version() == scenario.BUNDLE_VERSION
        v4 = replace(config, spec=SPEC_V4, bundle_version=4)
        blob = root.close_round(switch=VersionSwitch(config=v4, start=_carry))
        opened = open_model(blob, trusted_signers=scenario.signing_key("root").public_key())
        assert (opened.header.round, opened.header.bundle_version) == (1, 4)
        assert np.array_equal(opened.tensors["base.0.bias"], g0["base.0.bias"]), "same name and shape: carried"
        assert np.array_equal(opened.tensors["base.0.weight"], _init_v4()["base.0.weight"]), "other shape: the new bundle's"
        assert root.bundle_version == 4 and root.stored_version() == 4
    with RootAggregator.open(tmp_path / "root.sqlite", config) as again:
        assert again.stored_version() == 4, "a restart can tell which version the stored round runs"


def test_regional_refuses_a_newer_model_until_it_adopts_the_version(tmp_path: Path) -> None:
    config = scenario.regional_config(regional_weight=0.5)
    root_key = scenario.signing_key("root")
    with RootAggregator.open(tmp_path / "root.sqlite", scenario.root_config(regions=("eu",))) as root, \
            RegionalAggregator.open(tmp_path / "eu.sqlite", config) as region:
        region.handle_root_model(root.start_round(0, scenario.initial_model()))
        updates = scenario.device_updates(count=5)
        for u in updates:
            assert region.handle_update(scenario.seal(u, round=0)).verdict is Verdict.ACCEPTED
        region.close_round()
        root_config_v4 = replace(scenario.root_config(regions=("eu",)), spec=SPEC_V4, bundle_version=4)
        new_model = root.close_round(switch=VersionSwitch(config=root_config_v4, start=_carry))
        with pytest.raises(ModelRejectedError) as caught:
            region.handle_root_model(new_model)
        assert caught.value.reason == "bundle_version"
        region.adopt(replace(config, spec=SPEC_V4, bundle_version=4))
        served = open_model(region.handle_root_model(new_model), trusted_signers=scenario.signing_key("eu").public_key())
        assert (served.header.round, served.header.bundle_version) == (1, 4)
        assert set(served.tensors) == set(SPEC_V4)
        global_v4 = open_model(new_model, trusted_signers=root_key.public_key()).tensors
        # The old regional model mixes in only where it carries over (base.0.bias); the rest is the global model's.
        assert np.array_equal(served.tensors["base.1.weight"], global_v4["base.1.weight"])
        assert not np.array_equal(served.tensors["base.0.bias"], global_v4["base.0.bias"])
        # A device still on the old version: a signed rejection naming the cause, before any round check.
        handled = region.handle_update(scenario.seal(updates[0], round=0, nonce=scenario.random_nonce()))
        assert handled.verdict is Verdict.REJECTED and handled.reason == "wrong_bundle_version"
        receipt = open_receipt(handled.receipt, trusted_signers=scenario.signing_key("eu").public_key())
        assert receipt.status is ReceiptStatus.REJECTED and receipt.reason == "wrong_bundle_version"
        assert "v4" in handled.detail and f"v{scenario.BUNDLE_VERSION}" in handled.detail
