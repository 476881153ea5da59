"""``fedge dashboard``'s configuration: what it reads (one TOML file) and where it serves (the TOML or flags).

Parsed and validated here only; every problem is a ConfigError naming the
file and key. Relative paths resolve against the file's directory. Example
(docs/operations.md, "The dashboard")::

    fleet = "demo"
    metrics = ["http://127.0.0.1:9464/metrics", "http://127.0.0.1:9465/metrics"]

    [registries]            # region -> its aggregator's device registry (<id>.pub, revoked.txt): statuses are verified
    eu = "aggregators/eu/devices"

    [model_keys]            # optional: verify the models' round announcements (signer -> Ed25519 public key)
    root = "aggregators/root/keys/signing.pub"

    release_root = "release/root.json"   # optional (top level, above the tables): the release root of trust;
                            # the rollout's stage is then read from the retained TUF metadata, verified

    [mqtt]                  # the read-only monitoring account (fedge broker-config writes its credentials)
    credentials = "brokers/credentials/monitors/fedge-monitor.json"
    role = "root"           # root: every region's statuses (bridged), the root model, bridge states; region: one region

    [server]
    bind = "127.0.0.1"      # anything else needs auth_file and TLS (or plain_http = true behind a TLS proxy)
    port = 8765
"""

from __future__ import annotations

import ipaddress
import json
import sys
from dataclasses import dataclass, field, replace
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.daemon.errors import ConfigError
from device_agent.protocol.envelope import SenderKeys
from device_agent.daemon.toml_table import TomlTable
from device_agent.keys import load_verify_key
from device_agent.protocol.headers import check_id
from sdk.aggregator.service_config import check_listen_address

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

LOOPBACK_HOSTS = ("127.0.0.1", "::1")


@dataclass(frozen=True, kw_only=True)
class MonitorBroker:
    """The monitoring account's broker. ``role`` ``root`` (statuses of every region bridged there, the root
    model, bridge states) or ``region`` (the statuses and model of ``region``'s broker)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    role: str = "root"
    region: str | None = None
    max_packet_size: int = 5 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.role not in ("root", "region"):
            raise ValueError(f"role must be 'root' or 'region', got {self.role!r}")
        if self.role == "region" and self.region is None:
            raise ValueError("role 'region' needs the region's name")


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Where the page is served. Off loopback it needs ``auth_file`` (``user:password``, one line) and TLS
    (``tls_cert_file`` + ``tls_key_file``) unless ``plain_http`` (a TLS-terminating proxy in front)."""

    bind: str = "127.0.0.1"
    port: int = 8765
    auth_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    plain_http: bool = False

    def __post_init__(self) -> None:
        check_listen_address(self.bind, self.port)
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file come together")

    @property
    def loopback(self) -> bool:
        """Whether ``bind`` is a loopback address."""
        return ipaddress.ip_address(self.bind).is_loopback


@dataclass(frozen=True, kw_only=True)
class DashboardConfig:
    """What the dashboard reads and how often, and where it serves (module docstring).

    ``registries``: region -> its device keys (a :class:`~sdk.aggregator.registry.KeyRegistry`
    or a mapping; a status is verified against its region's, as ``fedge fleet
    status`` does). ``model_keys``: signer -> key for model announcements
    (empty: announcements are ignored). ``metrics``: aggregator endpoints.
    ``history_rounds``: rounds of accuracy and tallies kept in memory.
    ``release_root``: the fleet's TUF root (``release/root.json``); None: the controller's stage is not shown.
    """

    fleet: str
    topic_prefix: str = "fedge"
    mqtt: MonitorBroker | None
    registries: Mapping[str, SenderKeys] = field(repr=False)
    model_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict, repr=False)
    metrics: tuple[str, ...] = ()
    release_root: Path | None = None
    server: ServerSettings = ServerSettings()
    scrape_interval_s: float = 2.0
    push_interval_s: float = 1.0
    history_rounds: int = 200

    def __post_init__(self) -> None:
        check_id("fleet", self.fleet)
        for url in self.metrics:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"metrics URL {url!r} must be http(s)://host:port/path")
        if not (self.scrape_interval_s > 0 and self.push_interval_s > 0 and self.history_rounds >= 1):
            raise ValueError("scrape_interval_s and push_interval_s must be > 0, history_rounds >= 1")

    def with_server(self, **changes: Any) -> DashboardConfig:
        """A copy with some server settings replaced (the command line's flags)."""
        try:
            return replace(self, server=replace(self.server, **changes))
        except ValueError as exc:
            raise ConfigError(f"server: {exc}") from exc


def load_dashboard_config(path: str | Path) -> DashboardConfig:
    """Read and validate a dashboard TOML file (module docstring); ConfigError naming the file and key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    top = TomlTable(data, prefix="", source=path.name, base_dir=path.parent.resolve())
    fleet = top.identifier("fleet")
    registries = _registries(top)
    model_keys = _model_keys(top)
    mqtt = _mqtt(top)
    server = _server(top)
    metrics = top.value("metrics", [])
    release_root = top.path("release_root", None, must_exist=True)
    if not isinstance(metrics, list) or not all(isinstance(u, str) for u in metrics):
        raise top.error("metrics", "expected a list of URLs")
    try:
        config = DashboardConfig(fleet=fleet, mqtt=mqtt, registries=registries, model_keys=model_keys,
                                 metrics=tuple(metrics), release_root=release_root, server=server,
                                 scrape_interval_s=top.number("scrape_interval_s", 2.0, positive=True),
                                 push_interval_s=top.number("push_interval_s", 1.0, positive=True),
                                 history_rounds=top.integer("history_rounds", 200, minimum=1, maximum=100_000))
    except ValueError as exc:
        raise top.error("metrics", str(exc)) from exc
    top.done()
    return config


def _registries(top: TomlTable) -> dict[str, SenderKeys]:
    """``[registries]``: region -> :class:`~sdk.aggregator.registry.KeyRegistry` of its directory (revocations honoured)."""
    from sdk.aggregator.registry import KeyRegistry, RegistryError

    table = top.table("registries")
    registries: dict[str, SenderKeys] = {}
    for region in sorted(top.value("registries")):
        directory = table.path(region)
        try:
            check_id("region", region)
            registries[region] = KeyRegistry(directory)
        except (RegistryError, ValueError, OSError) as exc:
            raise table.error(region, str(exc)) from exc
    table.done()
    return registries


def _model_keys(top: TomlTable) -> dict[str, Ed25519PublicKey]:
    table = top.optional_table("model_keys")
    if table is None:
        return {}
    keys = {}
    raw = top.value("model_keys")
    for signer in sorted(raw):
        path = table.path(signer, must_exist=True)
        try:
            check_id("signer", signer)
            keys[signer] = load_verify_key(path)
        except (OSError, ValueError) as exc:
            raise table.error(signer, f"{path}: {exc}") from exc
    table.done()
    return keys


def _mqtt(top: TomlTable) -> MonitorBroker | None:
    table = top.optional_table("mqtt")
    if table is None:
        return None
    credentials = table.path("credentials", None, must_exist=True)
    values: dict[str, Any] = {}
    if credentials is not None:
        try:
            doc = json.loads(credentials.read_text(encoding="utf-8"))
            values = dict(host=str(doc["host"]), port=int(doc["port"]), username=str(doc["username"]),
                          password=str(doc["password"]), max_packet_size=int(doc.get("message_size_limit") or 5 << 20))
            if doc.get("tls"):
                values["ca_file"] = credentials.parent / str(doc["ca_file"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise table.error("credentials", f"{credentials}: not a credentials file of fedge broker-config: {exc}") from exc
    for key, getter in (("host", table.string), ("username", table.string)):
        value = getter(key, None)
        if value is not None:
            values[key] = value
    port = table.integer("port", None, minimum=1, maximum=65535)
    if port is not None:
        values["port"] = port
    password_file = table.path("password_file", None, must_exist=True)
    if password_file is not None:
        lines = password_file.read_text(encoding="utf-8").splitlines()
        values["password"] = lines[0] if lines else ""
    ca_file = table.path("ca_file", None, must_exist=True)
    if ca_file is not None:
        values["ca_file"] = ca_file
    if "host" not in values or "port" not in values:
        raise table.error("credentials", "give credentials = FILE, or host and port")
    try:
        broker = MonitorBroker(role=table.string("role", "root"), region=table.string("region", None), **values)
    except ValueError as exc:
        raise table.error("role", str(exc)) from exc
    table.done()
    return broker


def _server(top: TomlTable) -> ServerSettings:
    table = top.section("server")
    try:
        settings = ServerSettings(
            bind=table.string("bind", "127.0.0.1"), port=table.integer("port", 8765, minimum=0, maximum=65535),
            auth_file=table.path("auth_file", None, must_exist=True),
            tls_cert_file=table.path("tls_cert_file", None, must_exist=True),
            tls_key_file=table.path("tls_key_file", None, must_exist=True),
            plain_http=bool(table.value("plain_http", False)))
    except ValueError as exc:
        raise table.error("bind", str(exc)) from exc
    table.done()
    return settings
