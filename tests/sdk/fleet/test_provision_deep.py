"""``fedge fleet init`` on a three-level topology: middle tiers, cells bridged to them, keys wired tier to tier."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.daemon.config import load_config
from device_agent.daemon.keyring import load_device_keys
from device_agent.keys import key_id, load_recipient_key, load_verify_key
from sdk.aggregator.service_config import (
    load_middle_service_config,
    load_regional_service_config,
    load_root_service_config,
)
from sdk.fleet.day2 import add_device, move_device, open_fleet, remove_device
from sdk.fleet.inventory import InventoryError
from tests.sdk.fleet.conftest import DEEP_DEVICES, DEEP_PARENTS


def _agg(made, site: str) -> Path:
    return made.directory / "aggregators" / site


def _same(a: Path, b: Path, load=load_verify_key) -> bool:
    return load(a).public_bytes_raw() == load(b).public_bytes_raw()


def test_deep_fleet_init_wires_each_tier_to_the_one_above(make_fleet) -> None:
    made = make_fleet(deep=True)
    assert set(made.aggregators) == {"root", *DEEP_PARENTS}
    # Each tier's signing key sits with the tier above, and only there.
    assert sorted(p.name for p in (_agg(made, "root") / "regions").iterdir()) == ["eu.pub", "west.pub"]
    assert sorted(p.name for p in (_agg(made, "eu") / "regions").iterdir()) == ["eu-a.pub", "eu-b.pub"]
    for child, parent in DEEP_PARENTS.items():
        above = _agg(made, parent or "root")
        assert _same(above / "regions" / f"{child}.pub", _agg(made, child) / "keys/signing.pub")
        verify, encrypt = ("keys/root.pub", "keys/root.x25519.pub") if parent is None else ("keys/parent.pub", "keys/parent.x25519.pub")
        assert _same(_agg(made, child) / verify, above / "keys/signing.pub")
        assert _same(_agg(made, child) / encrypt, above / "keys/encryption.x25519.pub", load_recipient_key)
    # The services' own parsers take every file; deadlines nest (30 at the cells, 45 in the middle, 60 at the root).
    root = load_root_service_config(_agg(made, "root") / "root.toml")
    assert sorted(root.aggregator.region_keys) == ["eu", "west"] and root.aggregator.policy.quorum == 2
    middle = load_middle_service_config(_agg(made, "eu") / "middle.toml")
    assert (middle.aggregator.region, middle.aggregator.parent, middle.aggregator.policy.quorum) == ("eu", None, 2)
    assert middle.broker.port == made.spec.topology.region("eu").address.port and middle.broker.username == "eu-agg"
    assert not (_agg(made, "eu") / "devices").exists() and not (_agg(made, "eu") / "regional.toml").exists()
    deadlines = {"root": root.aggregator.policy.deadline_s, "eu": middle.aggregator.policy.deadline_s}
    for cell in DEEP_DEVICES:
        config = load_regional_service_config(_agg(made, cell) / "regional.toml")
        assert config.aggregator.parent == DEEP_PARENTS[cell]
        assert config.aggregator.policy.quorum == len(DEEP_DEVICES[cell])
        deadlines[cell] = config.aggregator.policy.deadline_s
    assert deadlines == {"root": 60.0, "eu": 45.0, "eu-a": 30.0, "eu-b": 30.0, "west": 30.0}
    # A cell's device dials its cell's broker and trusts its cell's key for models and receipts.
    config = load_config(made.devices["eu-a-d1"] / "agent.toml")
    assert (config.region, config.broker.port) == ("eu-a", made.spec.topology.region("eu-a").address.port)
    keys = load_device_keys(config)
    assert key_id(keys.receipt_signers[0]) == key_id(load_verify_key(_agg(made, "eu-a") / "keys/signing.pub"))
    # The cell's broker bridges to the middle tier's broker.
    bridge = next((made.directory / "brokers" / "eu-a").rglob("bridge*.conf")).read_text()
    assert f"address 127.0.0.1:{made.spec.topology.region('eu').address.port}" in bridge


def test_deep_fleet_day2_refuses_a_middle_tier_and_revokes_in_device_regions_only(make_fleet) -> None:
    made = make_fleet(deep=True)
    fleet = open_fleet(made.directory)
    with pytest.raises(InventoryError, match="middle tier.*eu-a, eu-b"):
        add_device(fleet, "eu-d9", "eu")
    with pytest.raises(InventoryError, match="middle tier"):
        move_device(fleet, "west-d1", "eu")
    change = add_device(fleet, "eu-b-d2", "eu-b")
    assert change.brokers == ("eu-b",) and change.aggregators == ("eu-b",)
    assert load_regional_service_config(_agg(made, "eu-b") / "regional.toml").aggregator.policy.quorum == 2
    change = remove_device(open_fleet(made.directory), "eu-a-d2")
    assert set(change.aggregators) == {"eu-a", "eu-b", "west"}
    for cell in DEEP_DEVICES:
        assert change.revoked_key in (_agg(made, cell) / "devices/revoked.txt").read_text()
    assert not (_agg(made, "eu") / "devices").exists()
    assert sorted(open_fleet(made.directory).registries()) == ["eu-a", "eu-b", "west"]
