"""``init_fleet``: one topology in, every key, broker, aggregator and device file out, each usable as it is."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from device_agent.daemon.config import load_config
from device_agent.daemon.errors import ConfigError
from device_agent.daemon.keyring import load_device_keys
from device_agent.keys import key_id, load_signing_key, load_verify_key
from sdk.aggregator.service_config import load_regional_service_config, load_root_service_config
from sdk.broker_config.passwords import verify_password
from sdk.broker_config.topology import TopologyError
from sdk.fleet import layout
from sdk.fleet.inventory import load_inventory
from sdk.fleet.provision import init_fleet
from sdk.fleet.spec import DEFAULT_STATE_DIR, parse_fleet_spec
from tests.sdk.fleet.conftest import loopback_topology

DEVICES = {"eu-dev-0001": "eu", "eu-dev-0002": "eu", "us-dev-0001": "us", "us-dev-0002": "us"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_fleet_init_writes_a_device_directory_the_agent_loads_as_it_is(make_fleet) -> None:
    made = make_fleet()
    assert sorted(made.devices) == sorted(DEVICES)
    for device, region in DEVICES.items():
        directory = made.devices[device]
        config = load_config(directory / "agent.toml")
        assert (config.device_id, config.fleet, config.region) == (device, "lab", region)
        assert config.broker.port == {"eu": 21884, "us": 21885}[region] and config.broker.host == "127.0.0.1"
        assert config.state_dir == directory / "var" / "state" and config.data.path == directory / "var/data/local.npz"
        assert config.bundle_path == directory / "bundles" / "model.fedge" and config.bundle_path.is_file()
        assert config.budget.epochs == 1 and config.threads == 1 and config.max_attempts == 5
        keys = load_device_keys(config)  # every key file is there and of the right type
        region_dir = made.directory / "aggregators" / region
        assert key_id(keys.receipt_signers[0]) == key_id(load_verify_key(region_dir / "keys/signing.pub"))
        registered = load_verify_key(region_dir / "devices" / f"{device}.pub")
        assert key_id(registered) == key_id(keys.signing_key.public_key())
        hashes = dict(line.split(":", 1) for line in (made.directory / "brokers" / region / "passwords").read_text().splitlines())
        assert verify_password(config.broker.read_password() or "", hashes[device])
        assert _mode(directory / "keys" / "device.key") == 0o600 and _mode(directory / "keys" / "mqtt-password") == 0o600
        text = (directory / "agent.toml").read_text()
        assert str(made.directory) not in text, "paths inside a provisioning directory are relative"


def test_fleet_init_matches_the_firmware_overlay_layout(make_fleet) -> None:
    """The Pi overlay's /etc/fedge/agent.toml.example names these files (examples/firmware-image, branch pi-kit)."""
    directory = make_fleet(tls=True).devices["eu-dev-0001"]
    for name in ("agent.toml", "keys/mqtt-password", "keys/ca.pem", "keys/fleet.pub", "keys/device.key",
                 "keys/aggregator.x25519.pub", "keys/root.pub", "keys/region.pub", "bundles/model.fedge"):
        assert (directory / name).is_file(), name
    config = load_config(directory / "agent.toml")
    assert config.broker.port == 28884 and config.broker.tls is not None
    assert config.broker.tls.ca_file == directory / "keys" / "ca.pem"


def test_fleet_init_default_state_dir_is_the_overlays(fleet_key, tmp_path) -> None:
    spec = parse_fleet_spec(loopback_topology().replace('state_dir = "var"', ""))
    assert spec.devices.state_dir == DEFAULT_STATE_DIR and spec.devices.data == "/var/lib/fedge/data/local.npz"
    from sdk.fleet.configs import render_agent_toml

    text = render_agent_toml(spec, device="eu-dev-0001", region=spec.topology.region("eu"))
    assert 'install_dir = "/var/lib/fedge/bundle"' in text and 'dir = "/var/lib/fedge/state"' in text


def test_fleet_init_aggregator_configs_run_as_they_are(make_fleet) -> None:
    made = make_fleet()
    root = load_root_service_config(made.aggregators["root"] / "root.toml")
    assert set(root.aggregator.region_keys) == {"eu", "us"} and root.aggregator.policy.quorum == 2  # type: ignore[arg-type]
    assert root.broker.username == "root-agg" and root.broker.port == 21883 and root.broker.password
    for region in ("eu", "us"):
        regional = load_regional_service_config(made.aggregators[region] / "regional.toml")
        assert set(regional.aggregator.device_keys) == {d for d, r in DEVICES.items() if r == region}  # type: ignore[arg-type]
        assert regional.aggregator.policy.quorum == 2 and regional.aggregator.policy.deadline_s == 30.0
        assert regional.broker.share_group == f"{region}-aggregators" and regional.broker.host == "127.0.0.1"
        signer = load_signing_key(made.aggregators["root"] / "keys/signing.key")
        assert key_id(regional.aggregator.root_verify_key) == key_id(signer.public_key())
    assert root.aggregator.policy.deadline_s == 45.0  # half as long again as a region


def test_fleet_init_announces_frame_versions_at_every_tier_unless_told_not_to(make_fleet) -> None:
    """A fleet made by init has only agents that read a model's ``frames`` field: every tier announces (devices and
    regions seal version 2); ``announce_frames = false`` in [aggregators.regional] / [aggregators.root] turns it off."""
    made = make_fleet()
    assert load_root_service_config(made.aggregators["root"] / "root.toml").aggregator.announced_frames == (1, 2)
    for region in ("eu", "us"):
        assert load_regional_service_config(made.aggregators[region] / "regional.toml").aggregator.announced_frames == (1, 2)
    quiet = make_fleet(extra="\n[aggregators.regional]\nannounce_frames = false\n[aggregators.root]\nannounce_frames = false\n")
    assert load_root_service_config(quiet.aggregators["root"] / "root.toml").aggregator.announced_frames is None
    assert load_regional_service_config(quiet.aggregators["eu"] / "regional.toml").aggregator.announced_frames is None


def test_fleet_init_keeps_keys_inventory_and_monitor_credentials(make_fleet, fleet_key) -> None:
    made = make_fleet()
    fleet_dir = made.directory
    assert key_id(load_signing_key(fleet_dir / "keys/fleet.key").public_key()) == key_id(fleet_key.public_key())
    assert (fleet_dir / layout.RELEASE_KEYS_DIR).is_dir() and _mode(fleet_dir / "keys") == 0o700
    inventory = load_inventory(fleet_dir / "inventory.json")
    assert {d: e.region for d, e in inventory.devices.items()} == DEVICES and inventory.revoked == ()
    monitor = json.loads((fleet_dir / "brokers/credentials/monitors/fedge-monitor.json").read_text())
    assert monitor["port"] == 21883 and set(monitor["regional_brokers"]) == {"eu", "us"}
    assert (fleet_dir / "topology.toml").read_text() == loopback_topology()


def test_fleet_init_without_a_bundle_leaves_room_for_one(make_fleet) -> None:
    made = make_fleet(bundle=False)
    assert made.bundle is None and not (made.devices["eu-dev-0001"] / "bundles").exists()
    load_config(made.devices["eu-dev-0001"] / "agent.toml")  # the agent checks the archive only when it starts


def test_fleet_init_refuses_a_non_empty_directory_and_bad_device_sections(make_fleet, tmp_path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        make_fleet(out=tmp_path / "busy")
    with pytest.raises(TopologyError, match=r"\[devices\] has unknown keys"):
        parse_fleet_spec(loopback_topology(extra="[devices.nope]\n").replace("[devices]\n", "[devices]\ncolour = 1\n"))
    with pytest.raises(TopologyError, match="quorum_fraction"):
        parse_fleet_spec(loopback_topology().replace("deadline_s = 30", "deadline_s = 30\nquorum_fraction = 0"))
    text = loopback_topology().replace("epochs = 1", "epochs = -1")
    with pytest.raises(ConfigError, match="training.epochs"):
        init_fleet(parse_fleet_spec(text), tmp_path / "bad", topology_text=text)


def test_fleet_init_with_mtls_gives_each_device_its_client_certificate(make_fleet) -> None:
    made = make_fleet(tls=True, mtls=True)
    config = load_config(made.devices["us-dev-0002"] / "agent.toml")
    assert config.broker.tls is not None and config.broker.tls.cert_file is not None
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(config.broker.tls.cert_file.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=us-dev-0002"
