"""Day-2 operations change one device and leave every other device's files byte-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_agent.daemon.config import load_config
from device_agent.keys import key_id, load_signing_key
from sdk.aggregator.registry import KeyRegistry
from sdk.aggregator.service_config import load_regional_service_config
from sdk.broker_config.passwords import verify_password
from sdk.fleet.day2 import add_device, move_device, open_fleet, rekey_device, remove_device
from sdk.fleet.inventory import InventoryError


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def devices_snapshot(fleet_dir: Path) -> dict[str, dict[str, bytes]]:
    return {d.name: snapshot(d) for d in sorted((fleet_dir / "devices").iterdir()) if not d.name.startswith(".")}


def password_lines(fleet_dir: Path, broker: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in (fleet_dir / "brokers" / broker / "passwords").read_text().splitlines())


def assert_others_untouched(before: dict[str, dict[str, bytes]], after: dict[str, dict[str, bytes]], *, changed: str) -> None:
    for device, files in before.items():
        if device != changed:
            assert after[device] == files, f"{device}'s files changed"


def test_a_day2_rewrite_keeps_the_regions_frame_announcing_as_it_was(make_fleet) -> None:
    """A region file written before init announced frame versions (no ``announce_frames`` key) serves agents that
    refuse the field: adding a device rewrites its quorum and leaves announcing off; a fleet made now keeps it on."""
    fleet_dir = make_fleet().directory
    eu = fleet_dir / "aggregators/eu/regional.toml"
    eu.write_text("\n".join(line for line in eu.read_text().splitlines() if not line.startswith("announce_frames")) + "\n")
    assert load_regional_service_config(eu).aggregator.announced_frames is None
    add_device(open_fleet(fleet_dir), "eu-dev-0003", "eu")
    add_device(open_fleet(fleet_dir), "us-dev-0003", "us")
    assert load_regional_service_config(eu).aggregator.announced_frames is None
    assert load_regional_service_config(eu).aggregator.policy.quorum == 3
    assert load_regional_service_config(fleet_dir / "aggregators/us/regional.toml").aggregator.announced_frames == (1, 2)
    eu.write_text("[aggregator\nnot toml")  # unreadable: rewritten from the topology as before, without announcing
    remove_device(open_fleet(fleet_dir), "eu-dev-0003")
    assert load_regional_service_config(eu).aggregator.announced_frames is None
    assert load_regional_service_config(eu).aggregator.policy.quorum == 2


def test_add_device_provisions_it_and_touches_no_other_device(make_fleet) -> None:
    fleet_dir = make_fleet().directory
    before, eu_before = devices_snapshot(fleet_dir), password_lines(fleet_dir, "eu")
    change = add_device(open_fleet(fleet_dir), "eu-dev-0003", "eu")
    after = devices_snapshot(fleet_dir)
    assert_others_untouched(before, after, changed="eu-dev-0003")
    assert set(after) == set(before) | {"eu-dev-0003"}
    config = load_config(fleet_dir / "devices/eu-dev-0003/agent.toml")
    lines = password_lines(fleet_dir, "eu")
    assert {u: h for u, h in lines.items() if u != "eu-dev-0003"} == eu_before
    assert verify_password(config.broker.read_password() or "", lines["eu-dev-0003"])
    assert "eu-dev-0003" in KeyRegistry(fleet_dir / "aggregators/eu/devices")
    assert load_regional_service_config(fleet_dir / "aggregators/eu/regional.toml").aggregator.policy.quorum == 3
    assert (change.brokers, change.aggregators) == (("eu",), ("eu",))
    credentials = json.loads((fleet_dir / "brokers/credentials/devices/eu-dev-0003.json").read_text())
    assert credentials["region"] == "eu" and credentials["port"] == 21884
    with pytest.raises(InventoryError, match="already an account"):
        add_device(open_fleet(fleet_dir), "eu-dev-0003", "us")
    with pytest.raises(InventoryError, match="already an account"):
        add_device(open_fleet(fleet_dir), "eu-agg", "eu")
    with pytest.raises(InventoryError, match="no region 'mars'"):
        add_device(open_fleet(fleet_dir), "m-1", "mars")


def test_remove_device_drops_account_registry_entry_and_revokes_its_key(make_fleet) -> None:
    fleet_dir = make_fleet().directory
    key = load_signing_key(fleet_dir / "devices/eu-dev-0002/keys/device.key")
    before = devices_snapshot(fleet_dir)
    change = remove_device(open_fleet(fleet_dir), "eu-dev-0002")
    after = devices_snapshot(fleet_dir)
    assert set(after) == set(before) - {"eu-dev-0002"}
    assert_others_untouched(before, after, changed="eu-dev-0002")
    assert "eu-dev-0002" not in password_lines(fleet_dir, "eu")
    assert not (fleet_dir / "brokers/credentials/devices/eu-dev-0002.json").exists()
    assert "eu-dev-0002" not in KeyRegistry(fleet_dir / "aggregators/eu/devices")
    for region in ("eu", "us"):
        assert key_id(key.public_key()) in (fleet_dir / f"aggregators/{region}/devices/revoked.txt").read_text()
    # A stale copy of its .pub file put back by hand does not let it in again.
    from device_agent.keys import save_public_key

    save_public_key(key.public_key(), fleet_dir / "aggregators/eu/devices/eu-dev-0002.pub")
    assert "eu-dev-0002" not in KeyRegistry(fleet_dir / "aggregators/eu/devices")
    assert change.revoked_key == key_id(key.public_key()) and change.device_dir is None
    assert load_regional_service_config(fleet_dir / "aggregators/eu/regional.toml").aggregator.policy.quorum == 1
    with pytest.raises(InventoryError, match="no device 'eu-dev-0002'"):
        remove_device(open_fleet(fleet_dir), "eu-dev-0002")


def test_rekey_device_replaces_key_and_password_and_revokes_the_old_key(make_fleet) -> None:
    fleet_dir = make_fleet().directory
    old = load_signing_key(fleet_dir / "devices/us-dev-0001/keys/device.key")
    old_hash = password_lines(fleet_dir, "us")["us-dev-0001"]
    before = devices_snapshot(fleet_dir)
    rekey_device(open_fleet(fleet_dir), "us-dev-0001")
    after = devices_snapshot(fleet_dir)
    assert_others_untouched(before, after, changed="us-dev-0001")
    new = load_signing_key(fleet_dir / "devices/us-dev-0001/keys/device.key")
    assert key_id(new.public_key()) != key_id(old.public_key())
    registry = KeyRegistry(fleet_dir / "aggregators/us/devices")
    assert key_id(registry("us-dev-0001")) == key_id(new.public_key())
    assert password_lines(fleet_dir, "us")["us-dev-0001"] != old_hash
    assert key_id(old.public_key()) in (fleet_dir / "aggregators/us/devices/revoked.txt").read_text()
    assert open_fleet(fleet_dir).inventory.devices["us-dev-0001"].key_id == key_id(new.public_key())


def test_move_device_leaves_the_old_region_in_the_same_operation(make_fleet) -> None:
    fleet_dir = make_fleet().directory
    key = load_signing_key(fleet_dir / "devices/eu-dev-0001/keys/device.key")
    before = devices_snapshot(fleet_dir)
    change = move_device(open_fleet(fleet_dir), "eu-dev-0001", "us")
    after = devices_snapshot(fleet_dir)
    assert_others_untouched(before, after, changed="eu-dev-0001")
    assert "eu-dev-0001" not in KeyRegistry(fleet_dir / "aggregators/eu/devices")
    assert key_id(KeyRegistry(fleet_dir / "aggregators/us/devices")("eu-dev-0001")) == key_id(key.public_key())
    assert "eu-dev-0001" not in password_lines(fleet_dir, "eu") and "eu-dev-0001" in password_lines(fleet_dir, "us")
    config = load_config(fleet_dir / "devices/eu-dev-0001/agent.toml")
    assert (config.region, config.broker.port) == ("us", 21885)
    us_signer = (fleet_dir / "aggregators/us/keys/signing.pub").read_bytes()
    assert (fleet_dir / "devices/eu-dev-0001/keys/region.pub").read_bytes() == us_signer
    assert set(change.brokers) == set(change.aggregators) == {"eu", "us"}
    quorum = {r: load_regional_service_config(fleet_dir / f"aggregators/{r}/regional.toml").aggregator.policy.quorum
              for r in ("eu", "us")}
    assert quorum == {"eu": 1, "us": 3}
    with pytest.raises(InventoryError, match="already in region us"):
        move_device(open_fleet(fleet_dir), "eu-dev-0001", "us")


def test_open_fleet_names_a_directory_that_is_not_a_fleet(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="not a fleet directory"):
        open_fleet(tmp_path)
