"""A fleet's description: the broker topology plus what ``fedge fleet init`` needs for devices and aggregators.

One ``topology.toml`` describes the whole fleet. Its broker part (``[fleet]``,
``[tls]``, ``[root]``, ``[[regions]]``, ``[monitor]``) is read by
:func:`sdk.broker_config.parse_topology`, unchanged (a region's ``parent``
makes the tree as deep as needed: root -> regions -> cells -> devices); two optional tables are
read here, and ignored by the broker generator:

``[devices]``
    ``state_dir`` (default ``/var/lib/fedge``, the firmware overlay's state
    directory; a relative path is taken inside each provisioning directory,
    for fleets that run on one machine), ``data_path`` and ``validation_path``
    (default ``<state_dir>/data/local.npz`` and none), and the sub-tables
    ``[devices.training]``, ``[devices.submit]``, ``[devices.backoff]``,
    ``[devices.broker]`` and ``[devices.release]`` copied into every
    ``agent.toml`` as they are (the agent's own parser checks them: docs/device-agent.md).
``[aggregators]``
    ``deadline_s`` (default 300) and ``quorum_fraction`` (default 1.0: a
    region's round closes when every device it knows answered, or at the
    deadline), and the sub-tables ``[aggregators.service]`` (copied into
    every aggregator TOML), ``[aggregators.regional]`` (extra
    ``[aggregator]`` keys of the regional services, e.g. ``regional_weight``;
    middle tiers take its ``regional_weight``, ``replay_rounds``, ``update_frames``
    and ``announce_frames``) and ``[aggregators.root]`` (extra ``[aggregator]`` keys of the root's).
    Every tier announces its frame versions (``announce_frames = true``) unless these tables say otherwise.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdk.broker_config.topology import Topology, TopologyError, parse_topology

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

DEFAULT_STATE_DIR = "/var/lib/fedge"
"""Where an agent keeps what it writes, on a device built from the firmware overlay (its unit's StateDirectory)."""
_DEVICE_PASSTHROUGH = ("training", "submit", "backoff", "broker", "release")
_AGGREGATOR_PASSTHROUGH = ("service", "regional", "root")


@dataclass(frozen=True, kw_only=True)
class DeviceDefaults:
    """What every device's ``agent.toml`` gets besides its identity, keys and broker (module docstring)."""

    state_dir: str = DEFAULT_STATE_DIR
    data_path: str | None = None
    validation_path: str | None = None
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def data(self) -> str:
        """The local data file the agent reads every round."""
        return self.data_path if self.data_path is not None else f"{self.state_dir}/data/local.npz"


@dataclass(frozen=True, kw_only=True)
class AggregatorDefaults:
    """Round settings and extra TOML for the aggregator services (module docstring)."""

    deadline_s: float = 300.0
    quorum_fraction: float = 1.0
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.deadline_s, (int, float)) and not isinstance(self.deadline_s, bool) and self.deadline_s > 0):
            raise TopologyError(f"[aggregators] deadline_s must be a positive number, not {self.deadline_s!r}")
        q = self.quorum_fraction
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
            raise TopologyError(f"[aggregators] quorum_fraction must be a number in (0, 1], not {q!r}")

    def quorum(self, devices: int) -> int:
        """A region's quorum for ``devices`` devices: the fraction rounded up, at least 1."""
        return max(1, math.ceil(self.quorum_fraction * devices - 1e-9))


@dataclass(frozen=True, kw_only=True)
class FleetSpec:
    """A whole fleet: its brokers (``topology``), device and aggregator defaults."""

    topology: Topology
    devices: DeviceDefaults = DeviceDefaults()
    aggregators: AggregatorDefaults = AggregatorDefaults()


def _table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise TopologyError(f"[{where}] must be a table")
    return dict(value)


def _string(table: dict[str, Any], key: str, where: str, default: str | None) -> str | None:
    value = table.pop(key, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise TopologyError(f"[{where}] {key} must be a non-empty string, not {value!r}")
    return value


def _sections(table: dict[str, Any], names: tuple[str, ...], where: str) -> dict[str, dict[str, Any]]:
    sections = {}
    for name in names:
        if name in table:
            value = table.pop(name)
            if not isinstance(value, dict):
                raise TopologyError(f"[{where}.{name}] must be a table")
            sections[name] = value
    return sections


def _leftover(table: dict[str, Any], where: str) -> None:
    if table:
        raise TopologyError(f"[{where}] has unknown keys: {sorted(table)}")


def parse_fleet_spec(text: str) -> FleetSpec:
    """Parse a topology file's text (TopologyError naming the bad key)."""
    topology = parse_topology(text)  # any depth: regions with a parent make middle tiers (sdk.fleet.tiers)
    data = tomllib.loads(text)  # parse_topology has already checked it is valid TOML
    devices = _table(data, "devices", "devices")
    device_sections = _sections(devices, _DEVICE_PASSTHROUGH, "devices")
    device_defaults = DeviceDefaults(
        state_dir=_string(devices, "state_dir", "devices", DEFAULT_STATE_DIR) or DEFAULT_STATE_DIR,
        data_path=_string(devices, "data_path", "devices", None),
        validation_path=_string(devices, "validation_path", "devices", None),
        sections=device_sections,
    )
    _leftover(devices, "devices")
    aggregators = _table(data, "aggregators", "aggregators")
    aggregator_sections = _sections(aggregators, _AGGREGATOR_PASSTHROUGH, "aggregators")
    aggregator_defaults = AggregatorDefaults(
        deadline_s=aggregators.pop("deadline_s", 300.0),
        quorum_fraction=aggregators.pop("quorum_fraction", 1.0),
        sections=aggregator_sections,
    )
    _leftover(aggregators, "aggregators")
    return FleetSpec(topology=topology, devices=device_defaults, aggregators=aggregator_defaults)


def load_fleet_spec(path: str | Path) -> FleetSpec:
    """Read and parse a topology file (TopologyError naming the file and the bad key; OSError when unreadable)."""
    path = Path(path)
    try:
        return parse_fleet_spec(path.read_text(encoding="utf-8"))
    except TopologyError as exc:
        raise TopologyError(f"{path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise TopologyError(f"{path}: not UTF-8 text") from exc
