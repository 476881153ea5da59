"""Day-2 operations on one device: add, remove, re-key, move to another region. No other device's files change.

Each operation edits exactly what the device's presence touches: its
provisioning directory, its line in its broker's password file, its
credentials, its key in its region's aggregator registry, the region's
quorum in ``regional.toml``, and the inventory. Removing and re-keying also
revoke the old key fleet-wide (``revoked.txt`` in every device region's registry),
so a stale copy of the ``.pub`` file can never let it back in. Moving takes the
device out of the old region's registry in the same operation (one device,
one region, one count; the root still refuses a device counted by two
regions, as a second line of defence). Devices join regions without child
regions only: a middle tier takes aggregates, never updates.

The running broker and aggregator learn of a change on SIGHUP: Mosquitto
re-reads its password and ACL files (and disconnects a removed account), the
aggregator re-reads its registry (:class:`~sdk.aggregator.registry.DeviceRegistry`).
:class:`FleetChange` says which ones must be signalled; :func:`signal_reloads`
does it for the processes ``fedge fleet up`` started.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from device_agent.daemon.errors import ConfigError
from device_agent.keys import key_id, load_signing_key, load_verify_key
from device_agent.protocol.envelope import SenderKeys
from sdk.broker_config import layout as broker_layout
from sdk.broker_config.passwords import hash_password, new_password, render_password_file
from sdk.broker_config.pki import Credential, issue_client_cert
from sdk.broker_config.render import CA_CERT_NAME, CA_KEY_NAME, PKI_DIR, credential_document, credential_path
from sdk.broker_config.topology import Account, Region, Role, TopologyError, _check_account
from sdk.fleet import layout
from sdk.aggregator.service_config import announces_frames
from sdk.fleet.configs import ANNOUNCE_FRAMES, render_regional_toml
from sdk.fleet.inventory import DeviceEntry, Inventory, InventoryError, Revocation, load_inventory, save_inventory
from sdk.fleet.provision import register_device, revoked_text, write_device_dir
from sdk.fleet.spec import FleetSpec, load_fleet_spec
from sdk.fleet.tiers import device_regions
from sdk.fleet.writes import write_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class OpenedFleet:
    """A fleet directory read back: its spec (``topology.toml``) and its inventory."""

    directory: Path
    spec: FleetSpec
    inventory: Inventory

    def region(self, name: str) -> Region:
        """The region called ``name``; InventoryError listing the regions when there is none."""
        try:
            return self.spec.topology.region(name)
        except KeyError:
            names = ", ".join(r.name for r in self.spec.topology.regions)
            raise InventoryError(f"no region {name!r} in this fleet (regions: {names})") from None

    def device_region(self, name: str) -> Region:
        """The region called ``name`` if devices can join it; InventoryError naming its cells for a middle tier."""
        region = self.region(name)
        below = self.spec.topology.children(name)
        if below:
            raise InventoryError(f"region {name!r} is a middle tier (it has child regions): its devices join one of "
                                 f"{', '.join(r.name for r in below)}")
        return region

    def registries(self) -> dict[str, SenderKeys]:
        """Every region devices can join -> its device registry (empty when it has no ``devices/`` directory yet)."""
        from sdk.aggregator.registry import KeyRegistry, RegistryError

        found: dict[str, SenderKeys] = {}
        for region in device_regions(self.spec.topology):
            try:
                found[region.name] = KeyRegistry(self.directory / layout.aggregator_dir(region.name) / layout.REGISTRY_DIR)
            except RegistryError:
                found[region.name] = {}  # every status claiming this region is then unverifiable
        return found

    def sites(self) -> dict[str, Path]:
        """``root`` and every region -> its aggregator directory."""
        names = (layout.ROOT_SITE, *(r.name for r in self.spec.topology.regions))
        return {name: self.directory / layout.aggregator_dir(name) for name in names}

    def device_dirs(self) -> dict[str, Path]:
        """Every device in the inventory -> its provisioning directory."""
        return {d: self.directory / layout.device_dir(d) for d in sorted(self.inventory.devices)}


@dataclass(frozen=True, kw_only=True)
class FleetChange:
    """What one operation did: ``brokers`` whose password file changed and ``aggregators`` whose registry
    changed (both must be sent SIGHUP), and the device's directory (None once removed)."""

    action: str
    device: str
    device_dir: Path | None
    brokers: tuple[str, ...]
    aggregators: tuple[str, ...]
    revoked_key: str | None = None
    notes: tuple[str, ...] = field(default=())


def open_fleet(directory: Path) -> OpenedFleet:
    """Read a fleet directory (FedgeError naming the file that is missing or wrong)."""
    directory = Path(directory).resolve()
    try:
        spec = load_fleet_spec(directory / layout.TOPOLOGY_FILE)
    except OSError as exc:
        raise InventoryError(f"{directory}: not a fleet directory (no readable {layout.TOPOLOGY_FILE}: "
                             f"{exc.strerror or exc})") from exc
    return OpenedFleet(directory=directory, spec=spec, inventory=load_inventory(directory / layout.INVENTORY_FILE))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _password_file(fleet: OpenedFleet, broker: str) -> Path:
    return fleet.directory / layout.BROKERS_DIR / broker / broker_layout.PASSWORD_FILE


def _set_password_line(fleet: OpenedFleet, broker: str, username: str, password: str | None) -> None:
    """Add, replace (``password``) or drop (None) one account's line; every other line stays as it was."""
    path = _password_file(fleet, broker)
    lines = dict(line.split(":", 1) for line in path.read_text(encoding="utf-8").splitlines() if ":" in line)
    if password is None:
        lines.pop(username, None)
    else:
        lines[username] = hash_password(password)
    write_file(path, render_password_file(lines), secret=True)


def _account(device: str, region: str) -> Account:
    return Account(username=device, role=Role.DEVICE, broker=region, region=region)


def _write_credentials(fleet: OpenedFleet, device: str, region: str, password: str) -> None:
    topology = fleet.spec.topology
    account = _account(device, region)
    brokers = fleet.directory / layout.BROKERS_DIR
    write_file(brokers / credential_path(account), credential_document(topology, account, password), secret=True)
    if topology.tls.require_client_certs:
        pki = brokers / PKI_DIR
        ca_key = load_pem_private_key((pki / CA_KEY_NAME).read_bytes(), password=None)
        ca = Credential(certificate=x509.load_pem_x509_certificate((pki / CA_CERT_NAME).read_bytes()),
                        private_key=ca_key)  # type: ignore[arg-type]
        client = issue_client_cert(ca, username=device, now=dt.datetime.now(dt.timezone.utc),
                                   valid_days=topology.tls.valid_days)
        write_file(brokers / credential_path(account, ".crt"), client.cert_pem, secret=False)
        write_file(brokers / credential_path(account, ".key"), client.key_pem, secret=True)


def _drop_credentials(fleet: OpenedFleet, device: str, region: str) -> None:
    account = _account(device, region)
    for suffix in (".json", ".crt", ".key"):
        (fleet.directory / layout.BROKERS_DIR / credential_path(account, suffix)).unlink(missing_ok=True)


def _rewrite_quorum(fleet: OpenedFleet, inventory: Inventory, region: str) -> None:
    path = fleet.directory / layout.aggregator_dir(region) / layout.REGIONAL_CONFIG
    write_file(path, render_regional_toml(fleet.spec, region=fleet.region(region), devices=len(inventory.in_region(region)),
                                          announce_frames=_announces(path)), secret=False)


def _announces(regional_toml: Path) -> bool:
    """Whether the region's service announces frame versions now: a fleet made before ``fleet init`` announced them
    runs agents that refuse the ``frames`` field, so a day-2 rewrite must not turn it on behind the operator's back.
    No file yet: as init writes it. A file the service itself could not read is rewritten (as before) without
    announcing, the setting every agent accepts, and said so."""
    if not regional_toml.exists():
        return ANNOUNCE_FRAMES
    try:
        return announces_frames(regional_toml)
    except ConfigError as exc:
        logger.warning("%s; rewriting it with announce_frames = false", exc)
        return False


def _write_revoked(fleet: OpenedFleet, inventory: Inventory) -> None:
    text = revoked_text(inventory)
    for region in device_regions(fleet.spec.topology):
        write_file(fleet.directory / layout.aggregator_dir(region.name) / layout.REVOKED_FILE, text, secret=False)


def _registry_file(fleet: OpenedFleet, region: str, device: str) -> Path:
    return fleet.directory / layout.aggregator_dir(region) / layout.REGISTRY_DIR / f"{device}.pub"


def _check_new_id(fleet: OpenedFleet, device: str) -> None:
    try:
        _check_account("device id", device)
    except TopologyError as exc:
        raise InventoryError(str(exc)) from None
    taken = {a.username for a in fleet.spec.topology.accounts() if a.role is not Role.DEVICE} | set(fleet.inventory.devices)
    if device in taken:
        raise InventoryError(f"{device!r} is already an account of this fleet")


def _new_credentials(fleet: OpenedFleet, device: str, region: Region, key: Ed25519PrivateKey) -> Path:
    """Password line, credentials, registry entry and provisioning directory for ``device`` in ``region``."""
    password = new_password()
    _set_password_line(fleet, region.name, device, password)
    _write_credentials(fleet, device, region.name, password)
    register_device(fleet.directory, region=region.name, device=device, key=key)
    return write_device_dir(fleet.directory, fleet.spec, device=device, region=region, key=key, password=password)


def add_device(fleet: OpenedFleet, device: str, region: str) -> FleetChange:
    """Provision a new device in ``region``: key, broker account, registry entry, provisioning directory."""
    _check_new_id(fleet, device)
    where = fleet.device_region(region)
    key = Ed25519PrivateKey.generate()
    directory = _new_credentials(fleet, device, where, key)
    inventory = fleet.inventory.with_device(device, DeviceEntry(region=region, key_id=key_id(key.public_key())))
    _rewrite_quorum(fleet, inventory, region)
    save_inventory(fleet.directory / layout.INVENTORY_FILE, inventory)
    return FleetChange(action="add", device=device, device_dir=directory, brokers=(region,), aggregators=(region,))


def remove_device(fleet: OpenedFleet, device: str) -> FleetChange:
    """Take ``device`` out: broker account, credentials, registry entry and directory gone; its key revoked."""
    entry = fleet.inventory.entry(device)
    _set_password_line(fleet, entry.region, device, None)
    _drop_credentials(fleet, device, entry.region)
    _registry_file(fleet, entry.region, device).unlink(missing_ok=True)
    inventory = fleet.inventory.without_device(device).with_revoked(
        Revocation(device=device, key_id=entry.key_id, reason="removed", at=_now()))
    _write_revoked(fleet, inventory)
    _rewrite_quorum(fleet, inventory, entry.region)
    directory = fleet.directory / layout.device_dir(device)
    if directory.exists():
        shutil.rmtree(directory)
    save_inventory(fleet.directory / layout.INVENTORY_FILE, inventory)
    regions = tuple(r.name for r in device_regions(fleet.spec.topology))
    return FleetChange(action="remove", device=device, device_dir=None, brokers=(entry.region,), aggregators=regions,
                       revoked_key=entry.key_id)


def rekey_device(fleet: OpenedFleet, device: str) -> FleetChange:
    """New identity key and broker password for ``device`` (old key revoked fleet-wide); its directory is rewritten."""
    entry = fleet.inventory.entry(device)
    key = Ed25519PrivateKey.generate()
    directory = _new_credentials(fleet, device, fleet.region(entry.region), key)
    inventory = fleet.inventory.with_device(device, DeviceEntry(region=entry.region, key_id=key_id(key.public_key())))
    inventory = inventory.with_revoked(Revocation(device=device, key_id=entry.key_id, reason="rekeyed", at=_now()))
    _write_revoked(fleet, inventory)
    save_inventory(fleet.directory / layout.INVENTORY_FILE, inventory)
    regions = tuple(r.name for r in device_regions(fleet.spec.topology))
    return FleetChange(action="rekey", device=device, device_dir=directory, brokers=(entry.region,), aggregators=regions,
                       revoked_key=entry.key_id, notes=("install the new provisioning directory on the device",))


def move_device(fleet: OpenedFleet, device: str, to_region: str) -> FleetChange:
    """Move ``device`` to ``to_region``: out of the old region's broker and registry, into the new ones, same key."""
    entry = fleet.inventory.entry(device)
    if entry.region == to_region:
        raise InventoryError(f"{device} is already in region {to_region}")
    target = fleet.device_region(to_region)
    old_pub = _registry_file(fleet, entry.region, device)
    public = load_verify_key(old_pub)
    if key_id(public) != entry.key_id:
        raise InventoryError(f"{old_pub} does not hold {device}'s current key {entry.key_id}")
    private = _load_device_key(fleet, device)
    old_pub.unlink()
    _set_password_line(fleet, entry.region, device, None)
    _drop_credentials(fleet, device, entry.region)
    directory = _new_credentials(fleet, device, target, private)
    inventory = fleet.inventory.with_device(device, DeviceEntry(region=to_region, key_id=entry.key_id))
    _rewrite_quorum(fleet, inventory, entry.region)
    _rewrite_quorum(fleet, inventory, to_region)
    save_inventory(fleet.directory / layout.INVENTORY_FILE, inventory)
    return FleetChange(action="move", device=device, device_dir=directory, brokers=(entry.region, to_region),
                       aggregators=(entry.region, to_region),
                       notes=("install the new provisioning directory on the device",))


def _load_device_key(fleet: OpenedFleet, device: str) -> Ed25519PrivateKey:
    return load_signing_key(fleet.directory / layout.device_dir(device) / layout.DEVICE_KEY)


# -- telling running processes --------------------------------------------------------------------


def pid_file(fleet_dir: Path, kind: str, site: str) -> Path:
    """Where ``fedge fleet up`` records the pid of ``kind`` (``broker`` or ``aggregator``) of ``site``."""
    return fleet_dir / layout.RUN_DIR / f"{kind}-{site}.pid"


def signal_reloads(fleet_dir: Path, change: FleetChange) -> dict[str, str]:
    """Send SIGHUP to the brokers and aggregators ``change`` names that ``fedge fleet up`` runs here.

    ``{"broker eu": "reloaded (pid 123)" | "not running here" | "stale pid file"}``.
    """
    outcome: dict[str, str] = {}
    for kind, sites in (("broker", change.brokers), ("aggregator", change.aggregators)):
        for site in sites:
            name = f"{kind} {site}"
            path = pid_file(fleet_dir, kind, site)
            try:
                pid = int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                outcome[name] = "not running here"
                continue
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                outcome[name] = "stale pid file"
            else:
                outcome[name] = f"reloaded (pid {pid})"
    return outcome


def describe(change: FleetChange) -> Mapping[str, object]:
    """``change`` as JSON-ready data."""
    return json.loads(json.dumps({
        "action": change.action, "device": change.device,
        "device_dir": None if change.device_dir is None else str(change.device_dir),
        "reload_brokers": list(change.brokers), "reload_aggregators": list(change.aggregators),
        "revoked_key": change.revoked_key, "notes": list(change.notes),
    }))
