"""Tiers of a fleet's sites and the order ``fedge fleet up`` starts them in (pure)."""

from __future__ import annotations

from sdk.broker_config.topology import parse_topology
from sdk.fleet.spec import parse_fleet_spec
from sdk.fleet.tiers import (
    Tier,
    broker_start_order,
    depth,
    describe_sites,
    device_regions,
    height,
    middle_tiers,
    service_start_order,
    tier_of,
)
from tests.sdk.fleet.conftest import deep_topology, loopback_topology

DEEP = parse_topology(deep_topology())
FLAT = parse_topology(loopback_topology())
EVERY = ["west", "eu-b", "root", "eu-a", "eu"]


def test_tiers_name_root_middle_and_regional_sites() -> None:
    assert [tier_of(DEEP, s) for s in ("root", "eu", "eu-a", "eu-b", "west")] == [
        Tier.ROOT, Tier.MIDDLE, Tier.REGIONAL, Tier.REGIONAL, Tier.REGIONAL]
    assert [r.name for r in device_regions(DEEP)] == ["eu-a", "eu-b", "west"]
    assert [r.name for r in middle_tiers(DEEP)] == ["eu"]
    assert (depth(DEEP, "root"), depth(DEEP, "eu"), depth(DEEP, "eu-a"), depth(DEEP, "west")) == (0, 1, 2, 1)
    assert (height(DEEP, "root"), height(DEEP, "eu"), height(DEEP, "eu-a"), height(DEEP, "west")) == (2, 1, 0, 0)
    assert describe_sites(DEEP) == "root + 1 middle tier + 3 regions"
    assert describe_sites(FLAT) == "root + 2 regions" and not middle_tiers(FLAT)


def test_tiers_start_brokers_parents_first_and_services_children_first() -> None:
    brokers = broker_start_order(DEEP, EVERY)
    services = service_start_order(DEEP, EVERY)
    for region in DEEP.regions:
        parent = region.parent or "root"
        assert brokers.index(parent) < brokers.index(region.name), brokers
        assert services.index(region.name) < services.index(parent), services
    assert brokers[0] == "root" and services[-1] == "root"
    assert broker_start_order(DEEP, ["eu-a", "eu-a"]) == ["eu-a"]  # a subset, each once
    assert service_start_order(FLAT, ["root", "us", "eu"]) == ["eu", "us", "root"]  # two levels: as before


def test_tiers_a_deep_topology_is_a_fleet_spec() -> None:
    spec = parse_fleet_spec(deep_topology())
    assert spec.topology.region("eu-a").parent == "eu"
