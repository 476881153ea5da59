"""``fedge fleet init``: from one topology file to every key, broker, aggregator and device file of a fleet.

:func:`init_fleet` writes the fleet directory of :mod:`sdk.fleet.layout`:
the fleet (bundle signing) key, the brokers (:func:`sdk.broker_config.generate_topology`;
a region with a ``parent`` gets a broker bridged to its parent region's broker),
the root's, each middle tier's and each region's aggregator directory with their
Ed25519 (signing) and X25519 (encryption) keys, each tier's public keys with the
tier above and the tier above's with it, and one provisioning directory per device with
its own Ed25519 key, its broker password and copies of every public key it
trusts. :func:`write_device_dir` and :func:`register_device` are the per-device
steps, shared with the day-2 operations (:mod:`sdk.fleet.day2`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.bundle.archive import verify_bundle
from device_agent.daemon.config import load_config
from device_agent.keys import key_id, load_verify_key, save_private_key, save_public_key
from sdk.aggregator.service_config import (
    load_middle_service_config,
    load_regional_service_config,
    load_root_service_config,
)
from sdk.broker_config import generate_topology
from sdk.broker_config.render import CA_CERT_NAME, CREDENTIALS_DIR, credential_path
from sdk.broker_config.topology import ROOT, Account, Region, Role
from sdk.fleet import layout
from sdk.fleet.configs import render_agent_toml, render_middle_toml, render_regional_toml, render_root_toml
from sdk.fleet.inventory import DeviceEntry, Inventory, save_inventory
from sdk.fleet.spec import FleetSpec
from sdk.fleet.tiers import Tier, describe_sites, parent_site, tier_of
from sdk.fleet.writes import link_or_copy, make_dir, write_file
from sdk.release.fleet_setup import init_release, key_policy

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ProvisionedFleet:
    """What :func:`init_fleet` wrote: device id -> provisioning directory, site -> aggregator directory."""

    directory: Path
    spec: FleetSpec
    devices: Mapping[str, Path]
    aggregators: Mapping[str, Path]
    bundle: Path | None


def fleet_bundle(fleet_dir: Path) -> Path | None:
    """The fleet's bundle (``bundles/model.fedge``), or None before one was given."""
    path = fleet_dir / layout.BUNDLE_FILE
    return path if path.is_file() else None


def _write_keypair(directory: Path, private: PurePosixPath, public: PurePosixPath,
                   key: Ed25519PrivateKey | X25519PrivateKey) -> None:
    save_private_key(key, directory / private)
    save_public_key(key.public_key(), directory / public)


def _account_password(fleet_dir: Path, account: Account) -> str:
    document = json.loads((fleet_dir / layout.BROKERS_DIR / credential_path(account)).read_text(encoding="utf-8"))
    return str(document["password"])


def write_device_dir(fleet_dir: Path, spec: FleetSpec, *, device: str, region: Region, key: Ed25519PrivateKey,
                     password: str) -> Path:
    """(Re)write ``devices/<device>``: agent.toml, its keys and password, the keys it trusts, CA, bundle. Its path.

    Only this device's directory is touched; a previous one is replaced whole.
    """
    target = fleet_dir / layout.device_dir(device)
    staging = target.with_name(f".{device}.new")
    shutil.rmtree(staging, ignore_errors=True)
    make_dir(staging, secret=True)
    make_dir(staging / layout.KEYS_DIR, secret=True)
    _write_keypair(staging, layout.DEVICE_KEY, layout.DEVICE_PUB, key)
    write_file(staging / layout.MQTT_PASSWORD, password + "\n", secret=True)
    aggregator = fleet_dir / layout.aggregator_dir(region.name)
    copies = {
        layout.TRUST_ANCHOR: fleet_dir / layout.RELEASE_ROOT,
        layout.DEVICE_FLEET_PUB: fleet_dir / layout.FLEET_PUB,
        layout.DEVICE_ROOT_PUB: fleet_dir / layout.aggregator_dir(layout.ROOT_SITE) / layout.SIGNING_PUB,
        layout.DEVICE_REGION_PUB: aggregator / layout.SIGNING_PUB,
        layout.DEVICE_AGGREGATOR_PUB: aggregator / layout.ENCRYPTION_PUB,
    }
    credentials = fleet_dir / layout.BROKERS_DIR / CREDENTIALS_DIR
    if spec.topology.tls.enabled:
        copies[layout.DEVICE_CA] = credentials / CA_CERT_NAME
    for name, source in copies.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, staging / name)
    if spec.topology.tls.require_client_certs:
        account = Account(username=device, role=Role.DEVICE, broker=region.name, region=region.name)
        shutil.copyfile(fleet_dir / layout.BROKERS_DIR / credential_path(account, ".crt"),
                        staging / layout.DEVICE_CLIENT_CERT)
        write_file(staging / layout.DEVICE_CLIENT_KEY,
                   (fleet_dir / layout.BROKERS_DIR / credential_path(account, ".key")).read_bytes(), secret=True)
    bundle = fleet_bundle(fleet_dir)
    if bundle is not None:
        link_or_copy(bundle, staging / layout.BUNDLE_FILE)
    write_file(staging / layout.AGENT_CONFIG, render_agent_toml(spec, device=device, region=region), secret=False)
    load_config(staging / layout.AGENT_CONFIG)  # the agent's own parser: a bad [devices] table fails here, not on the device
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def register_device(fleet_dir: Path, *, region: str, device: str, key: Ed25519PrivateKey) -> Path:
    """Put ``device``'s public key in ``region``'s aggregator registry (``devices/<id>.pub``); the file."""
    path = fleet_dir / layout.aggregator_dir(region) / layout.REGISTRY_DIR / f"{device}.pub"
    save_public_key(key.public_key(), path)
    return path


@dataclass(frozen=True)
class _TierKeys:
    signing: Ed25519PrivateKey
    encryption: X25519PrivateKey


def _new_site(fleet_dir: Path, site: str, account: Account) -> tuple[Path, _TierKeys]:
    """An aggregator directory with its own keys, the fleet key, the release trust anchor and its MQTT password."""
    directory = make_dir(fleet_dir / layout.aggregator_dir(site), secret=True)
    make_dir(directory / layout.KEYS_DIR, secret=True)
    keys = _TierKeys(signing=Ed25519PrivateKey.generate(), encryption=X25519PrivateKey.generate())
    _write_keypair(directory, layout.SIGNING_KEY, layout.SIGNING_PUB, keys.signing)
    _write_keypair(directory, layout.ENCRYPTION_KEY, layout.ENCRYPTION_PUB, keys.encryption)
    shutil.copyfile(fleet_dir / layout.FLEET_PUB, directory / layout.AGGREGATOR_FLEET_PUB)
    _copy_trust_anchor(fleet_dir, directory)
    write_file(directory / layout.MQTT_PASSWORD, _account_password(fleet_dir, account) + "\n", secret=True)
    return directory, keys


def _write_aggregators(fleet_dir: Path, spec: FleetSpec, *, inventory: Inventory) -> dict[str, Path]:
    """Every site's aggregator directory. Each tier's public keys go to the tier above (``regions/<name>.pub``)
    and the tier above's keys to it (``keys/root.pub`` right below the root, ``keys/parent.pub`` below a middle tier)."""
    topology = spec.topology
    root_account = Account(username=topology.root.aggregators[0], role=Role.AGGREGATOR, broker=ROOT, region=None)
    root_dir, root_keys = _new_site(fleet_dir, layout.ROOT_SITE, root_account)
    make_dir(root_dir / layout.REGION_KEYS_DIR)
    sites, keys = {layout.ROOT_SITE: root_dir}, {layout.ROOT_SITE: root_keys}
    for region in topology.regions:
        account = Account(username=region.aggregators[0], role=Role.AGGREGATOR, broker=region.name, region=region.name)
        sites[region.name], keys[region.name] = _new_site(fleet_dir, region.name, account)
        if tier_of(topology, region.name) is Tier.MIDDLE:
            make_dir(sites[region.name] / layout.REGION_KEYS_DIR)
    for region in topology.regions:
        directory, parent = sites[region.name], parent_site(topology, region)
        save_public_key(keys[region.name].signing.public_key(), sites[parent] / layout.REGION_KEYS_DIR / f"{region.name}.pub")
        verify, encrypt = ((layout.ROOT_VERIFY_PUB, layout.ROOT_ENCRYPTION_PUB) if region.parent is None
                           else (layout.PARENT_VERIFY_PUB, layout.PARENT_ENCRYPTION_PUB))
        save_public_key(keys[parent].signing.public_key(), directory / verify)
        save_public_key(keys[parent].encryption.public_key(), directory / encrypt)
        if tier_of(topology, region.name) is Tier.MIDDLE:
            write_file(directory / layout.MIDDLE_CONFIG, render_middle_toml(spec, region=region), secret=False)
        else:
            make_dir(directory / layout.REGISTRY_DIR)
            write_file(directory / layout.REVOKED_FILE, revoked_text(inventory), secret=False)
            write_file(directory / layout.REGIONAL_CONFIG,
                       render_regional_toml(spec, region=region, devices=len(region.devices)), secret=False)
    write_file(root_dir / layout.ROOT_CONFIG, render_root_toml(spec), secret=False)
    return sites


def _copy_trust_anchor(fleet_dir: Path, directory: Path) -> None:
    """The release root of trust (``keys/release/root.json``) into an aggregator directory."""
    make_dir((directory / layout.TRUST_ANCHOR).parent, secret=True)
    shutil.copyfile(fleet_dir / layout.RELEASE_ROOT, directory / layout.TRUST_ANCHOR)


def revoked_text(inventory: Inventory) -> str:
    """The registry's ``revoked.txt``: one ``<key id> <device> <reason> <when>`` line per revoked key."""
    lines = ["# Device keys the aggregator refuses even if a <device>.pub file names them (fedge fleet remove/rekey).\n"]
    lines += [f"{r.key_id} {r.device} {r.reason} {r.at}\n" for r in inventory.revoked]
    return "".join(lines)


def install_bundle_copies(fleet_dir: Path, bundle: Path, *, sites: Mapping[str, Path], devices: Mapping[str, Path]) -> Path:
    """Verify ``bundle`` with the fleet key and make it the fleet's: ``bundles/model.fedge`` here and in every
    aggregator and device directory. The fleet's copy's path (FedgeError when it does not verify)."""
    verify_bundle(bundle, load_verify_key(fleet_dir / layout.FLEET_PUB))
    own = fleet_dir / layout.BUNDLE_FILE
    make_dir(own.parent)
    if bundle.resolve() != own.resolve():
        shutil.copyfile(bundle, own)
    for directory in (*sites.values(), *devices.values()):
        link_or_copy(own, directory / layout.BUNDLE_FILE)
    return own


def check_aggregator_configs(fleet_dir: Path, spec: FleetSpec) -> None:
    """Load every aggregator TOML with the services' own parser (needs the bundle); ConfigError naming the file."""
    load_root_service_config(fleet_dir / layout.aggregator_dir(layout.ROOT_SITE) / layout.ROOT_CONFIG)
    for region in spec.topology.regions:
        tier = tier_of(spec.topology, region.name)
        load = load_middle_service_config if tier is Tier.MIDDLE else load_regional_service_config
        load(fleet_dir / layout.aggregator_dir(region.name) / layout.service_config(tier.value))


def init_fleet(
    spec: FleetSpec,
    out: Path,
    *,
    topology_text: str,
    fleet_key: Ed25519PrivateKey | None = None,
    bundle: Path | None = None,
    deploy_dir: PurePosixPath | None = None,
    owner: str | None = None,
    now: dt.datetime | None = None,
) -> ProvisionedFleet:
    """Write a whole fleet directory into the new or empty ``out`` (FileExistsError otherwise).

    ``topology_text`` is kept as ``topology.toml``. ``fleet_key`` None makes a
    new bundle signing key. ``bundle`` (verified with the fleet key) becomes
    every directory's ``bundles/model.fedge``; without it, :func:`install_bundle_copies`
    adds one later. ``deploy_dir`` and ``owner`` are passed to the broker
    generator; with an ``owner`` the fleet directory is made traversable
    (0711) so Mosquitto, dropped to that user, reaches its files.
    """
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; fleet init writes a new fleet directory")
    make_dir(out, secret=True)
    if owner is not None:
        out.chmod(0o711)
    write_file(out / layout.TOPOLOGY_FILE, topology_text, secret=False)
    make_dir(out / layout.KEYS_DIR, secret=True)
    make_dir(out / layout.RELEASE_KEYS_DIR, secret=True)
    init_release(out, policy=key_policy(topology_text))  # release keys, TUF repository, release/root.json
    fleet_key = fleet_key if fleet_key is not None else Ed25519PrivateKey.generate()
    _write_keypair(out, layout.FLEET_KEY, layout.FLEET_PUB, fleet_key)
    topology = spec.topology
    generate_topology(topology, out / layout.BROKERS_DIR, deploy_dir=deploy_dir, owner=owner, now=now)
    inventory = Inventory(fleet=topology.fleet)
    sites = _write_aggregators(out, spec, inventory=inventory)
    if bundle is not None:
        install_bundle_copies(out, bundle, sites=sites, devices={})
    devices: dict[str, Path] = {}
    for region in topology.regions:
        for device in region.devices:
            key = Ed25519PrivateKey.generate()
            register_device(out, region=region.name, device=device, key=key)
            account = Account(username=device, role=Role.DEVICE, broker=region.name, region=region.name)
            devices[device] = write_device_dir(out, spec, device=device, region=region, key=key,
                                               password=_account_password(out, account))
            inventory = inventory.with_device(device, DeviceEntry(region=region.name, key_id=key_id(key.public_key())))
    save_inventory(out / layout.INVENTORY_FILE, inventory)
    if bundle is not None:
        check_aggregator_configs(out, spec)
    logger.info("fleet %s: %s, %d devices written to %s", topology.fleet, describe_sites(topology), len(devices), out)
    return ProvisionedFleet(directory=out, spec=spec, devices=devices, aggregators=sites,
                            bundle=fleet_bundle(out))
