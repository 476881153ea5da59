"""Writing a generated topology to disk: one directory per broker, plus credentials and the CA.

Output layout (``out_dir``)::

    root/  eu/  us/ ...      one directory per broker, copied to that broker's host
      mosquitto.conf acl passwords data/ [conf.d/bridge-root.conf] [tls/...]
    credentials/             one JSON per device and aggregator (+ ca.crt, client certs)
    pki/                     the fleet CA key: keep it offline

Secrets (password files, bridge files, keys, credentials) are created 0600
and their directories 0700. Passwords, salts and keys are fresh on every run,
so the writer refuses a non-empty ``out_dir`` rather than mix two sets.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sdk.broker_config import layout
from sdk.broker_config.passwords import SALT_BYTES, hash_password, new_password
from sdk.broker_config.pki import Credential, create_ca, issue_client_cert, issue_server_cert
from sdk.broker_config.render import (
    CA_CERT_NAME,
    CA_KEY_NAME,
    CREDENTIALS_DIR,
    PKI_DIR,
    RenderedFile,
    broker_names,
    credential_path,
    render_config_files,
    render_credentials,
    render_password_files,
)
from sdk.broker_config.topology import ROOT, Role, Topology

_SECRET_DIRS = (CREDENTIALS_DIR, PKI_DIR)


@dataclass(frozen=True, kw_only=True)
class GeneratedBroker:
    """Files of one broker; the TLS paths are None when TLS is off, ``bridge_file`` is None at the root."""

    name: str
    directory: Path
    config_file: Path
    acl_file: Path
    password_file: Path
    persistence_dir: Path
    bridge_file: Path | None
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None


@dataclass(frozen=True, kw_only=True)
class GeneratedTopology:
    """What :func:`generate_topology` wrote; ``ca_*`` are None when TLS is off."""

    topology: Topology
    out_dir: Path
    brokers: tuple[GeneratedBroker, ...]
    credentials_dir: Path
    credential_files: Mapping[str, Path]
    ca_cert_file: Path | None
    ca_key_file: Path | None

    def broker(self, name: str) -> GeneratedBroker:
        """The broker called ``"root"`` or a region's name; KeyError if there is none."""
        for broker in self.brokers:
            if broker.name == name:
                return broker
        raise KeyError(name)


def _pem_files(topology: Topology, *, now: dt.datetime) -> tuple[RenderedFile, ...]:
    tls = topology.tls
    ca = create_ca(f"fedge {topology.fleet} fleet CA", now=now)
    ca_pem = ca.cert_pem.decode("ascii")

    def pair(cred: Credential, cert: PurePosixPath, key: PurePosixPath) -> list[RenderedFile]:
        return [RenderedFile(path=cert, text=cred.cert_pem.decode("ascii"), secret=False),
                RenderedFile(path=key, text=cred.key_pem.decode("ascii"), secret=True)]

    files = pair(ca, PKI_DIR / CA_CERT_NAME, PKI_DIR / CA_KEY_NAME)
    files.append(RenderedFile(path=CREDENTIALS_DIR / CA_CERT_NAME, text=ca_pem, secret=False))
    for name in broker_names(topology):
        directory = PurePosixPath(name)
        server = issue_server_cert(ca, hosts=[topology.address(name).host], now=now, valid_days=tls.valid_days)
        files.append(RenderedFile(path=directory / layout.CA_FILE, text=ca_pem, secret=False))
        files += pair(server, directory / layout.SERVER_CERT_FILE, directory / layout.SERVER_KEY_FILE)
    if tls.require_client_certs:
        for account in topology.accounts():
            if account.role is Role.MONITOR and account.broker != ROOT:
                continue  # one certificate for the monitoring account, valid at every broker
            client = issue_client_cert(ca, username=account.username, now=now, valid_days=tls.valid_days)
            if account.role is Role.BRIDGE:
                directory = PurePosixPath(str(account.region))
                files += pair(client, directory / layout.BRIDGE_CERT_FILE, directory / layout.BRIDGE_KEY_FILE)
            else:
                files += pair(client, credential_path(account, ".crt"), credential_path(account, ".key"))
    return tuple(files)


def _write(out_dir: Path, file: RenderedFile) -> None:
    path = out_dir / file.path
    for parent in reversed(file.path.parents[:-1]):
        directory = out_dir / parent
        if not directory.exists():
            directory.mkdir(mode=0o700 if parent.parts[0] in {d.name for d in _SECRET_DIRS} else 0o755)
    # O_EXCL and the mode at creation: a secret is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if file.secret else 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(file.text)


def _broker_record(topology: Topology, out_dir: Path, name: str) -> GeneratedBroker:
    directory = out_dir / name
    tls = topology.tls.enabled
    return GeneratedBroker(
        name=name,
        directory=directory,
        config_file=directory / layout.CONFIG_FILE,
        acl_file=directory / layout.ACL_FILE,
        password_file=directory / layout.PASSWORD_FILE,
        persistence_dir=directory / layout.PERSISTENCE_DIR,
        bridge_file=None if name == ROOT else directory / layout.BRIDGE_FILE,
        ca_file=directory / layout.CA_FILE if tls else None,
        cert_file=directory / layout.SERVER_CERT_FILE if tls else None,
        key_file=directory / layout.SERVER_KEY_FILE if tls else None,
    )


def _opened_after_privilege_drop(topology: Topology, broker: GeneratedBroker) -> list[Path]:
    """Files Mosquitto 2.0 opens as user ``mosquitto``: the password and ACL files, the TLS keys, persistence."""
    paths = [broker.password_file, broker.acl_file, broker.persistence_dir]
    if broker.key_file is not None:
        paths.append(broker.key_file)
    if topology.tls.require_client_certs and broker.name != ROOT:
        paths.append(broker.directory / layout.BRIDGE_KEY_FILE)
    return paths


def generate_topology(
    topology: Topology,
    out_dir: Path,
    *,
    deploy_dir: PurePosixPath | None = None,
    owner: str | None = None,
    now: dt.datetime | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> GeneratedTopology:
    """Write every broker's files, fresh credentials and (with TLS) a new PKI into ``out_dir``.

    ``deploy_dir`` is the directory each broker's files will occupy on its own
    host; None makes the configs name files where they are written (absolute
    paths under ``out_dir``), so the brokers can run in place. ``owner`` (e.g.
    ``"mosquitto"``, needs root) gets the files Mosquitto opens after dropping
    privileges (password file, ACL, TLS keys, persistence directory); None
    leaves ownership alone. ``now`` defaults to the current UTC time.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; generate into a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    now = now or dt.datetime.now(dt.timezone.utc)

    usernames = [a.username for a in topology.accounts()]
    passwords = {u: new_password(random_bytes) for u in usernames}
    hashes = {u: hash_password(passwords[u], salt=random_bytes(SALT_BYTES)) for u in usernames}
    bridge_passwords = {r.name: passwords[r.bridge_username] for r in topology.regions}
    bases = {b: deploy_dir if deploy_dir is not None else PurePosixPath(out_dir / b) for b in broker_names(topology)}

    files = (
        render_config_files(topology, bases=bases, bridge_passwords=bridge_passwords)
        + render_password_files(topology, hashes)
        + render_credentials(topology, passwords)
        + (_pem_files(topology, now=now) if topology.tls.enabled else ())
    )
    for file in files:
        _write(out_dir, file)

    brokers = tuple(_broker_record(topology, out_dir, name) for name in broker_names(topology))
    for broker in brokers:
        broker.persistence_dir.mkdir(mode=0o700)
        if owner is not None:
            for path in _opened_after_privilege_drop(topology, broker):
                shutil.chown(path, user=owner)

    credential_files = {
        a.username: out_dir / credential_path(a) for a in topology.accounts()
        if a.role is not Role.BRIDGE and (a.role is not Role.MONITOR or a.broker == ROOT)
    }
    tls = topology.tls.enabled
    return GeneratedTopology(
        topology=topology,
        out_dir=out_dir,
        brokers=brokers,
        credentials_dir=out_dir / CREDENTIALS_DIR,
        credential_files=credential_files,
        ca_cert_file=out_dir / PKI_DIR / CA_CERT_NAME if tls else None,
        ca_key_file=out_dir / PKI_DIR / CA_KEY_NAME if tls else None,
    )
