"""The release tools bound to one fleet directory: repository, keys, the root broker, the devices' statuses.

:func:`open_release_fleet` reads what ``fedge fleet init`` wrote: the
topology and inventory (:func:`sdk.fleet.day2.open_fleet`), the release
setup (:mod:`sdk.release.fleet_setup`) and the release account's credentials
(``brokers/credentials/releases/<name>.json``), with which the tools publish
to the root broker and read the statuses bridged up to it. Statuses are
verified against the regions' registries exactly as ``fedge fleet status``
does (:func:`sdk.fleet.status_view.build_view`): nothing unverified is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.errors import FedgeError
from device_agent.keys import load_verify_key
from device_agent.protocol.status import DeviceStatus
from sdk.aggregator.service_config import BrokerSettings
from sdk.broker_config.render import CREDENTIALS_DIR
from sdk.fleet import layout
from sdk.fleet.day2 import OpenedFleet, open_fleet
from sdk.fleet.status_fetch import BrokerEndpoint, fetch_statuses
from sdk.fleet.status_view import FleetView, build_view
from sdk.release.fleet_setup import ReleaseSetup
from sdk.release.keys import ROLES, load_signers
from sdk.release.repository import ReleaseRepository, Signers


class ReleaseFleetError(FedgeError, ValueError):
    """The fleet directory lacks what the release tools need; the message names it."""


@dataclass(frozen=True, kw_only=True)
class ReleaseFleet:
    """One fleet as the release tools see it."""

    fleet: OpenedFleet
    setup: ReleaseSetup
    endpoint: BrokerEndpoint
    message_size_limit: int

    @property
    def directory(self) -> Path:
        """The fleet directory."""
        return self.fleet.directory

    @property
    def name(self) -> str:
        """The fleet id."""
        return self.fleet.spec.topology.fleet

    def repository(self) -> ReleaseRepository:
        """The fleet's TUF repository (read afresh)."""
        return self.setup.repository()

    def signers(self, key_dirs: Sequence[Path] = ()) -> Signers:
        """Every role's signers found in ``key_dirs`` and the fleet's ``keys/release``."""
        dirs = [*key_dirs, self.setup.key_dir]
        return {role: load_signers(dirs, role) for role in ROLES}

    def fleet_key(self) -> Ed25519PublicKey:
        """The bundle signing key's public half."""
        return load_verify_key(self.directory / layout.FLEET_PUB)

    def devices(self) -> dict[str, str]:
        """device -> region, from the inventory."""
        return {device: entry.region for device, entry in self.fleet.inventory.devices.items()}

    def broker(self, client_id: str) -> BrokerSettings:
        """How the release tools reach the root broker (as ``client_id``)."""
        e = self.endpoint
        return BrokerSettings(host=e.host, port=e.port, client_id=client_id, username=e.username, password=e.password,
                              tls_ca_file=e.ca_file, tls_cert_file=e.cert_file, tls_key_file=e.key_file,
                              max_packet_size=self.message_size_limit + 1024)

    def statuses(self, *, timeout_s: float = 10.0) -> FleetView:
        """Every device's retained status from the root broker, verified against its region's registry."""
        topology = self.fleet.spec.topology
        registries = self.fleet.registries()
        messages = fetch_statuses({layout.ROOT_SITE: self.endpoint}, source="root", topics=topology.layout,
                                  timeout_s=timeout_s)
        return build_view(layout=topology.layout, regions=list(registries), registries=registries,
                          expected=self.devices(), messages=messages)


def verified_statuses(view: FleetView) -> dict[str, DeviceStatus | None]:
    """device -> its verified status (None when it sent none that verifies)."""
    return {row.device: row.status for rows in view.regions.values() for row in rows}


def open_release_fleet(directory: str | os.PathLike[str]) -> ReleaseFleet:
    """The fleet in ``directory`` for the release tools (ReleaseFleetError naming what is missing)."""
    fleet = open_fleet(Path(directory))
    topology = fleet.spec.topology
    setup = ReleaseSetup(fleet_dir=fleet.directory)
    if not setup.repository_dir.is_dir():
        raise ReleaseFleetError(f"{setup.repository_dir}: this fleet has no release repository (made by `fedge fleet init`)")
    if topology.release is None:
        raise ReleaseFleetError("this fleet has no release account ([release] enabled = false in its topology)")
    credentials = fleet.directory / layout.BROKERS_DIR / CREDENTIALS_DIR
    path = credentials / "releases" / f"{topology.release}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReleaseFleetError(f"{path}: cannot read the release account's credentials ({exc})") from exc

    def file(key: str) -> Path | None:
        return None if doc.get(key) is None else credentials / str(doc[key])

    endpoint = BrokerEndpoint(name=layout.ROOT_SITE, host=str(doc["host"]), port=int(doc["port"]),
                              username=str(doc["username"]), password=str(doc["password"]), ca_file=file("ca_file"),
                              cert_file=file("client_cert_file"), key_file=file("client_key_file"))
    return ReleaseFleet(fleet=fleet, setup=setup, endpoint=endpoint, message_size_limit=topology.message_size_limit)
