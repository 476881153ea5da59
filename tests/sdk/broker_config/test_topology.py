"""topology.toml parsing and the rules every topology obeys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sdk.broker_config.topology import (
    BrokerAddress,
    Region,
    Role,
    RootBroker,
    Topology,
    TopologyError,
    load_topology,
    parse_topology,
)

EXAMPLE = Path(__file__).resolve().parents[3] / "broker_config" / "topology.toml"

SMALL = (Path(__file__).parent / "data" / "small_topology.toml").read_text(encoding="utf-8")
MINIMAL = SMALL.replace("message_size_limit = 1000\n", "").replace("[tls]\nenabled = true\n", "").replace(
    'bind = "127.0.0.2"\n', "")


def test_parse_topology_minimal_applies_defaults() -> None:
    topology = parse_topology(MINIMAL)
    assert topology.fleet == "f" and topology.topic_prefix == "fedge"
    assert topology.root.address == BrokerAddress(host="root.example", port=1883, tls_port=8883, bind=None)
    assert topology.region("eu").devices == ("eu-dev-0001", "eu-dev-0002")
    assert topology.region("eu").address.bind is None and topology.region("us").devices == ("us-1",)
    assert not topology.tls.enabled
    assert topology.message_size_limit == 5 * 1024 * 1024


def test_load_topology_reads_the_committed_example() -> None:
    topology = load_topology(EXAMPLE)
    assert [r.name for r in topology.regions] == ["eu", "us"]
    assert topology.region("us").devices == ("us-dev-0001", "us-dev-0002", "us-dev-0003")
    assert topology.tls.enabled


def test_topology_accounts_by_broker() -> None:
    topology = parse_topology(MINIMAL)
    root = {(a.username, a.role) for a in topology.accounts("root")}
    assert root == {("root-agg", Role.AGGREGATOR), ("bridge-eu", Role.BRIDGE), ("bridge-us", Role.BRIDGE),
                    ("fedge-monitor", Role.MONITOR), ("fedge-release", Role.RELEASE)}
    eu = [a for a in topology.accounts("eu") if a.role is not Role.MONITOR]
    assert [a.username for a in eu] == ["eu-agg", "eu-dev-0001", "eu-dev-0002"]
    assert all(a.region == "eu" for a in eu)
    assert [(a.username, a.region) for a in topology.accounts("eu") if a.role is Role.MONITOR] == [("fedge-monitor", None)]


def test_topology_monitor_account_is_optional_renamable_and_unique() -> None:
    assert parse_topology(MINIMAL + "\n[monitor]\nenabled = false\n").monitor is None
    assert parse_topology(MINIMAL + "\n[monitor]\nusername = \"ops-ro\"\n").monitor == "ops-ro"
    with pytest.raises(TopologyError, match="used twice"):
        parse_topology(MINIMAL + "\n[monitor]\nusername = \"root-agg\"\n")
    with pytest.raises(TopologyError, match="unknown keys"):
        parse_topology(MINIMAL + "\n[monitor]\nuser = \"x\"\n")


def test_topology_fleet_sections_are_left_to_fleet_init() -> None:
    parsed = parse_topology(MINIMAL + "\n[devices]\nstate_dir = \"var\"\n[aggregators]\ndeadline_s = 30\n")
    assert parsed == parse_topology(MINIMAL)


def test_topology_with_addresses_moves_only_named_brokers() -> None:
    topology = parse_topology(MINIMAL)
    moved = topology.with_addresses({"eu": BrokerAddress(host="127.0.0.1", port=1, tls_port=2, bind="127.0.0.1")})
    assert moved.region("eu").address.port == 1 and moved.root == topology.root
    with pytest.raises(KeyError):
        topology.with_addresses({"mars": moved.root.address})


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('name = "f"', 'name = "f/x"', "fleet"),
        ('name = "eu"', 'name = "root"', "reserved"),
        ('name = "eu"', 'name = "EU"', "region name"),
        ('name = "eu"', 'name = "us"', "region names must be unique"),
        ("device_count = 2", 'devices = ["a+b"]', "devices"),
        ("device_count = 2", 'devices = ["eu-agg"]', "used twice"),
        ("device_count = 2", 'devices = ["bridge-eu"]', "used twice"),
        ("device_count = 2", 'devices = ["x", "x"]', "more than once"),
        ("device_count = 2", 'device_count = 2\ndevices = ["x"]', "both"),
        ("device_count = 2", 'device_count = 2\ndevice_id_pattern = "d-{n}"', "index"),
        ("device_count = 2", 'device_count = 2\ndevice_id_pattern = "d"', "index"),
        ('host = "eu.example"', 'host = "eu.example"\nport = 70000', "port"),
        ('host = "eu.example"', 'host = "eu.example"\nport = 8883', "differ"),
        ('host = "eu.example"', 'host = "eu.example"\nbind = "everywhere"', "bind"),
        ('host = "eu.example"', 'host = "::1"', "host"),
        ('host = "eu.example"', 'host = "eu.example"\nprot = 1', "unknown keys"),
        ('aggregators = ["eu-agg"]', "aggregators = []", "at least one aggregator"),
        ('aggregators = ["eu-agg"]', 'aggregators = ["us-agg"]', "used twice"),
        ('aggregators = ["eu-agg"]', 'aggregators = "eu-agg"', "wrong type"),
        ('[fleet]\nname = "f"', '[fleet]\nname = "f"\nmessage_size_limit = 0', "message_size_limit"),
        ('[fleet]\nname = "f"', '[fleet]\nname = "f"\n[tls]\nrequire_client_certs = true', "tls.enabled"),
        ('[fleet]\nname = "f"', "[fleet]", "missing 'name'"),
        ('[fleet]\nname = "f"', '[fleet]\nname = "f"\nx = [', "not valid TOML"),
    ],
)
def test_parse_topology_rejects(old: str, new: str, message: str) -> None:
    assert old in MINIMAL
    with pytest.raises(TopologyError, match=message):
        parse_topology(MINIMAL.replace(old, new, 1))


def test_topology_built_in_code_is_validated_too() -> None:
    topology = parse_topology(MINIMAL)
    with pytest.raises(TopologyError, match="region names must be unique"):
        dataclasses.replace(topology, regions=(topology.regions[0], topology.regions[0]))
    with pytest.raises(TopologyError, match="message_size_limit"):
        dataclasses.replace(topology, message_size_limit=True)
    with pytest.raises(TopologyError, match="at least one region"):
        Topology(fleet="f", root=RootBroker(address=BrokerAddress(host="r"), aggregators=("a",)), regions=())
    with pytest.raises(TopologyError, match="list of names"):
        Region(name="eu", address=BrokerAddress(host="e"), aggregators="agg")  # type: ignore[arg-type]
    assert isinstance(TopologyError("x"), ValueError)
