"""Every text file of a generated topology, as data: configs, ACLs, password files, credentials.

Pure: secrets (passwords, hashes, PEM) come in as arguments, files go out as
:class:`RenderedFile` values; :mod:`sdk.broker_config.writer` draws the
randomness and writes them. :func:`render_example_files` renders the
committed, secret-free example (placeholders instead of passwords).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from sdk.broker_config import layout
from sdk.broker_config.acl import render_region_acl, render_root_acl
from sdk.broker_config.layout import BrokerPaths
from sdk.broker_config.mosquitto import render_bridge_conf, render_region_conf, render_root_conf
from sdk.broker_config.passwords import render_password_file
from sdk.broker_config.topology import ROOT, Account, Role, Topology

BRIDGE_PASSWORD_PLACEHOLDER = "CHANGE-ME-run-fedge-broker-config-generate"
"""Stands for the bridge password in the committed examples."""
EXAMPLE_DEPLOY_DIR = PurePosixPath("/etc/mosquitto/fedge")
"""Directory the committed examples assume each broker's files are copied to on its host."""
CREDENTIALS_DIR = PurePosixPath("credentials")
PKI_DIR = PurePosixPath("pki")
CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"


@dataclass(frozen=True, kw_only=True)
class RenderedFile:
    """One file of the output: ``path`` is relative to the output directory; ``secret`` means mode 0600."""

    path: PurePosixPath
    text: str
    secret: bool


def broker_names(topology: Topology) -> tuple[str, ...]:
    """``"root"`` then every region, which is also the output's directory names."""
    return (ROOT, *(r.name for r in topology.regions))


def render_config_files(
    topology: Topology, *, bases: Mapping[str, PurePosixPath], bridge_passwords: Mapping[str, str]
) -> tuple[RenderedFile, ...]:
    """Each broker's ``mosquitto.conf`` and ACL, and each region's bridge file.

    ``bases`` maps each broker name to the directory its config names files
    under; ``bridge_passwords`` maps region names to their bridge passwords.
    """
    root_dir = PurePosixPath(ROOT)
    files = [
        RenderedFile(path=root_dir / layout.CONFIG_FILE, secret=False,
                     text=render_root_conf(topology, paths=BrokerPaths(base=bases[ROOT]))),
        RenderedFile(path=root_dir / layout.ACL_FILE, secret=False, text=render_root_acl(topology)),
    ]
    for region in topology.regions:
        paths = BrokerPaths(base=bases[region.name])
        directory = PurePosixPath(region.name)
        files += [
            RenderedFile(path=directory / layout.CONFIG_FILE, secret=False,
                         text=render_region_conf(topology, region, paths=paths)),
            RenderedFile(path=directory / layout.ACL_FILE, secret=False, text=render_region_acl(topology, region)),
            RenderedFile(path=directory / layout.BRIDGE_FILE, secret=True,
                         text=render_bridge_conf(topology, region, paths=paths,
                                                 password=bridge_passwords[region.name])),
        ]
    return tuple(files)


def render_example_files(topology: Topology) -> tuple[RenderedFile, ...]:
    """The committed example: configs under :data:`EXAMPLE_DEPLOY_DIR`, a placeholder bridge password."""
    return render_config_files(
        topology,
        bases={name: EXAMPLE_DEPLOY_DIR for name in broker_names(topology)},
        bridge_passwords={r.name: BRIDGE_PASSWORD_PLACEHOLDER for r in topology.regions},
    )


def render_password_files(topology: Topology, hashes: Mapping[str, str]) -> tuple[RenderedFile, ...]:
    """Each broker's password file from ``{username: $7$ hash}`` (every account must have one)."""
    files = []
    for broker in broker_names(topology):
        accounts = topology.accounts(broker)
        text = render_password_file({a.username: hashes[a.username] for a in accounts})
        files.append(RenderedFile(path=PurePosixPath(broker) / layout.PASSWORD_FILE, text=text, secret=True))
    return tuple(files)


def credential_path(account: Account, suffix: str = ".json") -> PurePosixPath:
    """Where an account's credentials go, relative to the output directory."""
    return CREDENTIALS_DIR / f"{account.role.value}s" / f"{account.username}{suffix}"


def credential_document(topology: Topology, account: Account, password: str) -> str:
    """The credentials JSON of one device, aggregator or monitoring account (see :func:`render_credentials`)."""
    tls = topology.tls
    address = topology.address(account.broker)
    cert = credential_path(account, ".crt").relative_to(CREDENTIALS_DIR)
    key = credential_path(account, ".key").relative_to(CREDENTIALS_DIR)
    document: dict[str, object] = {
        "fleet": topology.fleet,
        "topic_prefix": topology.topic_prefix,
        "role": account.role.value,
        "region": account.region,
        "username": account.username,
        "password": password,
        "broker": account.broker,
        "host": address.host,
        "port": address.tls_port if tls.enabled else address.port,
        "tls": tls.enabled,
        "ca_file": CA_CERT_NAME if tls.enabled else None,
        "client_cert_file": str(cert) if tls.require_client_certs else None,
        "client_key_file": str(key) if tls.require_client_certs else None,
        "message_size_limit": topology.message_size_limit,
    }
    if account.role is Role.MONITOR:
        document["regional_brokers"] = {
            r.name: {"host": r.address.host, "port": r.address.tls_port if tls.enabled else r.address.port}
            for r in topology.regions
        }
    return json.dumps(document, indent=2) + "\n"


def render_credentials(topology: Topology, passwords: Mapping[str, str]) -> tuple[RenderedFile, ...]:
    """One JSON file per device and aggregator: what that client needs to connect.

    Bridges get none: their password is already in their region's bridge file.
    ``port`` is the one to dial (the TLS port when TLS is on); file names are
    relative to the ``credentials`` directory, and null when TLS (or mTLS) is off.
    The monitoring account gets one file, for the root, with ``regional_brokers``
    (region -> host and port) beside it: the same password works at every broker.
    """
    return tuple(
        RenderedFile(path=credential_path(account), text=credential_document(topology, account, passwords[account.username]),
                     secret=True)
        for account in topology.accounts()
        if account.role is not Role.BRIDGE and (account.role is not Role.MONITOR or account.broker == ROOT)
    )
