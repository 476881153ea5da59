"""The fleet's inventory: which devices exist, in which region, with which key; which keys are revoked.

``inventory.json`` in the fleet directory is what ``fedge fleet add / remove
/ rekey / move`` read and write (the topology file keeps the regions and
brokers; its device lists are only the initial ones). Pure data and one
reader/writer pair; the JSON is small (one line per device) and rewritten
atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from device_agent.errors import FedgeError
from sdk.fleet.writes import write_file

FORMAT = 1


class InventoryError(FedgeError, ValueError):
    """The inventory is unreadable, or an operation does not fit it (unknown device, id taken, ...)."""


@dataclass(frozen=True, kw_only=True)
class DeviceEntry:
    """One device: its region and the id (:func:`device_agent.keys.key_id`) of its current Ed25519 key."""

    region: str
    key_id: str


@dataclass(frozen=True, kw_only=True)
class Revocation:
    """A device key that must never be accepted again; ``reason`` is ``removed`` or ``rekeyed``."""

    device: str
    key_id: str
    reason: str
    at: str


@dataclass(frozen=True, kw_only=True)
class Inventory:
    """The devices of fleet ``fleet`` (id -> entry) and every revoked key."""

    fleet: str
    devices: Mapping[str, DeviceEntry] = field(default_factory=dict)
    revoked: tuple[Revocation, ...] = ()

    def entry(self, device: str) -> DeviceEntry:
        """The device's entry; InventoryError naming it when there is none."""
        if device not in self.devices:
            raise InventoryError(f"no device {device!r} in this fleet")
        return self.devices[device]

    def in_region(self, region: str) -> tuple[str, ...]:
        """The ids of ``region``'s devices, sorted."""
        return tuple(sorted(d for d, e in self.devices.items() if e.region == region))

    def with_device(self, device: str, entry: DeviceEntry) -> Inventory:
        """A copy with ``device`` set to ``entry``."""
        return replace(self, devices={**self.devices, device: entry})

    def without_device(self, device: str) -> Inventory:
        """A copy without ``device``."""
        return replace(self, devices={d: e for d, e in self.devices.items() if d != device})

    def with_revoked(self, revocation: Revocation) -> Inventory:
        """A copy with one more revoked key."""
        return replace(self, revoked=(*self.revoked, revocation))

    @property
    def revoked_key_ids(self) -> frozenset[str]:
        """Every revoked key id."""
        return frozenset(r.key_id for r in self.revoked)

    def to_json(self) -> str:
        """The file's text: stable key order, one device per line."""
        devices = ",\n".join(f"    {json.dumps(d)}: {json.dumps({'region': e.region, 'key_id': e.key_id})}"
                             for d, e in sorted(self.devices.items()))
        revoked = ",\n".join(f"    {json.dumps(vars(r), sort_keys=True)}" for r in self.revoked)
        return (f'{{\n  "format": {FORMAT},\n  "fleet": {json.dumps(self.fleet)},\n'
                f'  "devices": {{\n{devices}\n  }},\n  "revoked": [\n{revoked}\n  ]\n}}\n')


def _parse(data: Any) -> Inventory:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InventoryError(f"not a format-{FORMAT} inventory")
    devices = {str(d): DeviceEntry(region=str(e["region"]), key_id=str(e["key_id"])) for d, e in data["devices"].items()}
    revoked = tuple(Revocation(device=str(r["device"]), key_id=str(r["key_id"]), reason=str(r["reason"]), at=str(r["at"]))
                    for r in data["revoked"])
    return Inventory(fleet=str(data["fleet"]), devices=devices, revoked=revoked)


def load_inventory(path: Path) -> Inventory:
    """Read ``inventory.json``; InventoryError naming the file when it is missing or malformed."""
    try:
        return _parse(json.loads(path.read_text(encoding="utf-8")))
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read: {exc.strerror or exc} (is this a fleet directory?)") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InventoryError(f"{path}: malformed inventory: {exc}") from exc


def save_inventory(path: Path, inventory: Inventory) -> None:
    """Write ``inventory.json`` atomically."""
    write_file(path, inventory.to_json(), secret=False)
