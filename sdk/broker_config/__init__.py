"""Mosquitto configuration for a fedge fleet: one root broker and one bridged broker per region.

``load_topology`` reads a ``topology.toml``; ``generate_topology`` writes every
broker's ``mosquitto.conf``, ACL, password file and TLS material plus the
per-account credentials the operator hands out. Rendering is pure (``mosquitto``,
``acl``, ``passwords``, ``render``); only ``writer`` and ``pki`` key generation
touch the outside world.
"""

from __future__ import annotations

from sdk.broker_config.topology import (
    BrokerAddress,
    Region,
    RootBroker,
    TlsSettings,
    Topology,
    TopologyError,
    load_topology,
    parse_topology,
)
from sdk.broker_config.writer import GeneratedBroker, GeneratedTopology, generate_topology

__all__ = [
    "BrokerAddress",
    "GeneratedBroker",
    "GeneratedTopology",
    "Region",
    "RootBroker",
    "TlsSettings",
    "Topology",
    "TopologyError",
    "generate_topology",
    "load_topology",
    "parse_topology",
]
