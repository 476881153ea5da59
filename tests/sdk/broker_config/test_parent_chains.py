"""Topologies deeper than two levels: regions with a ``parent``, bridges that chain up, ACLs on the middle brokers."""

from __future__ import annotations

import pytest

from sdk.broker_config.acl import render_region_acl, render_root_acl
from sdk.broker_config.mosquitto import render_bridge_conf
from pathlib import PurePosixPath

from sdk.broker_config.layout import BrokerPaths
from sdk.broker_config.topology import ROOT, Role, Topology, TopologyError, parse_topology
from sdk.fleet.spec import parse_fleet_spec

DEEP = """
[fleet]
name = "f"
[root]
host = "root.example"
aggregators = ["root-agg"]
[[regions]]
name = "eu"
host = "eu.example"
aggregators = ["eu-agg"]
[[regions]]
name = "eu-a"
parent = "eu"
host = "eu-a.example"
port = 1884
aggregators = ["eu-a-agg"]
devices = ["a-1", "a-2"]
[[regions]]
name = "eu-a-x"
parent = "eu-a"
host = "eu-a-x.example"
aggregators = ["eu-a-x-agg"]
[[regions]]
name = "us"
host = "us.example"
aggregators = ["us-agg"]
devices = ["u-1"]
"""


def _deep(**changes: str) -> str:
    text = DEEP
    for old, new in changes.items():
        text = text.replace(old, new)
    return text


@pytest.fixture
def topology() -> Topology:
    # eu-a has devices and a child below it in DEEP; move the devices to the leaf for a valid tree.
    return parse_topology(_deep(**{'devices = ["a-1", "a-2"]\n': "", 'aggregators = ["eu-a-x-agg"]\n':
                                   'aggregators = ["eu-a-x-agg"]\ndevices = ["a-1", "a-2"]\n'}))


def test_parent_chain_puts_each_bridge_account_on_its_parents_broker(topology: Topology) -> None:
    assert [r.name for r in topology.children(ROOT)] == ["eu", "us"]
    assert [r.name for r in topology.descendants("eu")] == ["eu-a", "eu-a-x"]
    bridges = {a.username: a.broker for a in topology.accounts() if a.role is Role.BRIDGE}
    assert bridges == {"bridge-eu": ROOT, "bridge-eu-a": "eu", "bridge-eu-a-x": "eu-a", "bridge-us": ROOT}


def test_bridge_below_a_middle_tier_dials_its_parent_and_maps_its_model_to_root_model(topology: Topology) -> None:
    text = render_bridge_conf(topology, topology.region("eu-a"), paths=BrokerPaths(base=PurePosixPath("/etc/m")), password="pw")
    assert "address eu.example:1883\n" in text and "connection fedge-f-eu-a-to-eu\n" in text
    assert "topic # in 1 fedge/f/root/model/ fedge/f/model/\n" in text  # the middle tier's model, read as root/model
    assert "topic # out 1 fedge/f/region/eu-a/up/ fedge/f/region/eu-a/up/\n" in text
    assert "topic # in 1 fedge/f/region/eu-a/down/ fedge/f/region/eu-a/down/\n" in text
    # ... and it relays its own child's device statuses on towards the root.
    assert "topic +/status out 1 fedge/f/region/eu-a-x/dev/ fedge/f/region/eu-a-x/dev/\n" in text
    top = render_bridge_conf(topology, topology.region("eu"), paths=BrokerPaths(base=PurePosixPath("/etc/m")), password="pw")
    assert "address root.example:1883\n" in top and "topic # in 1 fedge/f/root/model/ fedge/f/root/model/\n" in top
    assert "connection fedge-f-eu-to-root\n" in top


def test_middle_broker_acl_confines_each_child_bridge_to_its_own_subtree(topology: Topology) -> None:
    acl = render_region_acl(topology, topology.region("eu"))
    block = acl.split("user bridge-eu-a\n")[1].split("\n\n")[0].splitlines()
    assert block == [
        "topic write fedge/f/region/eu-a/up/#",
        "topic write fedge/f/region/eu-a/dev/+/status",
        "topic write fedge/f/region/eu-a-x/dev/+/status",
        "topic write fedge/f/region/eu-a/bridge/state",
        "topic read fedge/f/model/#",
        "topic read fedge/f/region/eu-a/down/#",
        "topic read fedge/f/release/#",
    ]
    assert "user bridge-eu-a-x" not in acl  # a grandchild's bridge authenticates one level down, at eu-a
    root = render_root_acl(topology)
    assert "user bridge-eu\n" in root and "user bridge-us\n" in root and "user bridge-eu-a\n" not in root
    assert "topic write fedge/f/region/eu-a-x/dev/+/status" in root.split("user bridge-eu\n")[1].split("\n\n")[0]


@pytest.mark.parametrize("changes, message", [
    ({'parent = "eu"\n': 'parent = "asia"\n'}, "not a region of this topology"),
    ({'name = "eu"\nhost = "eu.example"\n': 'name = "eu"\nparent = "eu-a-x"\nhost = "eu.example"\n'}, "form a cycle"),
    ({'parent = "eu"\n': 'parent = "eu-a"\n'}, "its own parent|another region's name"),
    ({}, "has child regions and devices"),
])
def test_parent_mistakes_are_named(changes: dict[str, str], message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        parse_topology(_deep(**changes))


def test_fleet_provisioning_takes_a_tree_deeper_than_two_levels(topology: Topology) -> None:
    text = _deep(**{'devices = ["a-1", "a-2"]\n': "", 'aggregators = ["eu-a-x-agg"]\n':
                    'aggregators = ["eu-a-x-agg"]\ndevices = ["a-1", "a-2"]\n'})
    spec = parse_fleet_spec(text)  # fedge fleet init provisions any depth (tests/sdk/fleet/test_provision_deep.py)
    assert spec.topology.region("eu-a-x").parent == "eu-a"
