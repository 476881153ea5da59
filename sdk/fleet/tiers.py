"""Which tier each site of a fleet is, and in which order ``fedge fleet up`` starts them (pure).

A site is ``root`` or a region of the topology. A region with child regions
(``parent`` chains, docs/broker.md "Bridging chains") is a *middle* tier: its
aggregator takes its children's aggregates and it has no devices. Every other
region is a *regional* (leaf) tier: devices, or none yet. Brokers start parents
first, so a child's bridge finds its parent listening; services start children
first (leaves, then middle tiers, then the root), so every tier is subscribed
to its parent's model before the root publishes round 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from sdk.broker_config.topology import ROOT, Region, Topology


class Tier(str, Enum):
    """What runs at a site: the ``fedge aggregator`` subcommand of its service."""

    ROOT = "root"
    MIDDLE = "middle"
    REGIONAL = "regional"


def tier_of(topology: Topology, site: str) -> Tier:
    """The tier of ``site`` (``root`` or a region name; KeyError for anything else)."""
    if site == ROOT:
        return Tier.ROOT
    topology.region(site)
    return Tier.MIDDLE if topology.children(site) else Tier.REGIONAL


def parent_site(topology: Topology, region: Region) -> str:
    """The site right above ``region``: ``root`` or its parent region."""
    return topology.parent_broker(region)


def depth(topology: Topology, site: str) -> int:
    """0 for the root, 1 right below it, and so on."""
    level, current = 0, site
    while current != ROOT:
        current = topology.parent_broker(topology.region(current))
        level += 1
    return level


def height(topology: Topology, site: str) -> int:
    """0 for a leaf region, 1 for a tier whose children are leaves, ...: the longest way down to devices."""
    below = topology.children(site)
    return 0 if not below else 1 + max(height(topology, child.name) for child in below)


def device_regions(topology: Topology) -> tuple[Region, ...]:
    """The regions devices can join (every region without child regions), in topology order."""
    return tuple(r for r in topology.regions if not topology.children(r.name))


def middle_tiers(topology: Topology) -> tuple[Region, ...]:
    """The regions with child regions, in topology order."""
    return tuple(r for r in topology.regions if topology.children(r.name))


def sites(topology: Topology) -> tuple[str, ...]:
    """``root`` and every region, in topology order."""
    return (ROOT, *(r.name for r in topology.regions))


def broker_start_order(topology: Topology, chosen: Iterable[str]) -> list[str]:
    """``chosen`` sites, parents before children (root first, then by depth, topology order within a depth)."""
    order = sites(topology)
    return sorted(set(chosen), key=lambda s: (depth(topology, s), order.index(s)))


def service_start_order(topology: Topology, chosen: Iterable[str]) -> list[str]:
    """``chosen`` sites, children before parents (leaves, then middle tiers by height, the root last)."""
    order = sites(topology)
    return sorted(set(chosen), key=lambda s: (height(topology, s), order.index(s)))


def describe_sites(topology: Topology) -> str:
    """``root + 1 middle tier + 3 regions`` (what ``fedge fleet init`` prints)."""
    middles, leaves = len(middle_tiers(topology)), len(device_regions(topology))
    parts = ["root"]
    if middles:
        parts.append(f"{middles} middle tier{'s' if middles != 1 else ''}")
    parts.append(f"{leaves} region{'s' if leaves != 1 else ''}")
    return " + ".join(parts)
