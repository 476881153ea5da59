"""The broker topology of a fleet: a root broker and one bridged broker per region.

A region bridges to the root, or (``parent``) to another region's broker:
the tree can be as deep as the aggregators (root -> regions -> cells ->
devices; docs/broker.md, "Bridging chains"). A region with children is a
middle tier: its aggregator takes its children's aggregates, so it has no devices.

A ``topology.toml`` names the fleet, the root broker, each region's broker, its
devices (an explicit list or a count and an id pattern) and the aggregator
accounts, plus TLS and the message size limit. :func:`parse_topology` turns it
into frozen dataclasses; each dataclass checks its own fields when it is built,
so a topology made in code is held to the same rules as one read from a file.
Device id == MQTT username, so ids must be safe as topic segments and as
password-file keys.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import string
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from device_agent.errors import FedgeError
from device_agent.protocol.topics import TopicLayout

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

ROOT = "root"
"""Name of the root broker (its directory and its key in address maps); no region may use it."""

_RESERVED_REGION_NAMES = frozenset({ROOT, "credentials", "pki"})
_ACCOUNT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_MAX_MQTT_PAYLOAD = 268_435_455
DEFAULT_MESSAGE_SIZE_LIMIT = 5 * 1024 * 1024
DEFAULT_MONITOR = "fedge-monitor"
DEFAULT_RELEASE = "fedge-release"
"""The root broker account of the release tools (publisher, controller) unless ``[release] username`` says otherwise."""
RELEASE_POLICY_KEYS = ("root_keys", "root_threshold", "targets_keys", "targets_threshold")
"""``[release]`` keys that configure no broker (the release keys' policy, read by ``fedge fleet init``)."""
"""The read-only monitoring account's name unless ``[monitor] username`` says otherwise."""
FLEET_SECTIONS = frozenset({"devices", "aggregators"})
"""Top-level tables of a topology file that ``fedge fleet init`` reads and the broker generator ignores."""


class TopologyError(FedgeError, ValueError):
    """A topology is invalid; the message names the offending key or value."""


def _check_account(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _ACCOUNT_RE.fullmatch(name):
        raise TopologyError(
            f"{kind} {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-' starting with a letter or digit"
        )
    return name


def _check_port(kind: str, port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise TopologyError(f"{kind} must be an integer port in 1..65535, not {port!r}")
    return port


def _check_accounts(kind: str, names: Iterable[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        raise TopologyError(f"{kind} must be a list of names, not a string")
    names = tuple(names)
    for name in names:
        _check_account(kind, name)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TopologyError(f"{kind} lists {duplicates} more than once")
    return names


@dataclass(frozen=True, kw_only=True)
class BrokerAddress:
    """Where one broker listens.

    ``host`` is what devices and bridges dial (a DNS name or an IPv4 address);
    it also goes into the server certificate. ``bind`` is the listener address;
    None binds every interface. With TLS on, the plain ``port`` is bound to
    127.0.0.1 only (for co-located aggregators) and remote clients use ``tls_port``.
    """

    host: str
    port: int = 1883
    tls_port: int = 8883
    bind: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not _HOST_RE.fullmatch(self.host):
            raise TopologyError(f"host {self.host!r} must be a DNS name or an IPv4 address (no IPv6 literals)")
        _check_port("port", self.port)
        _check_port("tls_port", self.tls_port)
        if self.port == self.tls_port:
            raise TopologyError(f"port and tls_port must differ (both {self.port})")
        if self.bind is not None:
            try:
                ipaddress.IPv4Address(self.bind)
            except ValueError as exc:
                raise TopologyError(f"bind {self.bind!r} must be an IPv4 address") from exc


@dataclass(frozen=True, kw_only=True)
class RootBroker:
    """The root broker: regional bridges and root aggregators connect to it."""

    address: BrokerAddress
    aggregators: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "aggregators", _check_accounts("root aggregators", self.aggregators))
        if not self.aggregators:
            raise TopologyError("the root needs at least one aggregator account")


@dataclass(frozen=True, kw_only=True)
class Region:
    """One region: its broker, its aggregator accounts and its devices.

    ``devices`` may be empty (devices are added later); ``aggregators`` may not.
    ``parent``: the region whose broker this one bridges to (None: the root broker).
    """

    name: str
    address: BrokerAddress
    aggregators: tuple[str, ...]
    devices: tuple[str, ...] = ()
    parent: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _REGION_RE.fullmatch(self.name):
            raise TopologyError(f"region name {self.name!r} must be 1-32 lowercase letters, digits or '-'")
        if self.name in _RESERVED_REGION_NAMES:
            raise TopologyError(f"region name {self.name!r} is reserved")
        object.__setattr__(self, "aggregators", _check_accounts(f"region {self.name} aggregators", self.aggregators))
        object.__setattr__(self, "devices", _check_accounts(f"region {self.name} devices", self.devices))
        if not self.aggregators:
            raise TopologyError(f"region {self.name} needs at least one aggregator account")
        if self.parent is not None and (self.parent == self.name or not _REGION_RE.fullmatch(str(self.parent))):
            raise TopologyError(f"region {self.name}: parent {self.parent!r} must be another region's name")

    @property
    def bridge_username(self) -> str:
        """Account the region's bridge uses on its parent's broker (the root's, or its parent region's)."""
        return f"bridge-{self.name}"


@dataclass(frozen=True, kw_only=True)
class TlsSettings:
    """TLS for every broker. Off means plain MQTT only (a lab or a closed network).

    ``require_client_certs`` adds mTLS on the TLS listeners: every account then
    also needs a client certificate from the fleet CA (passwords still apply).
    """

    enabled: bool = False
    require_client_certs: bool = False
    valid_days: int = 825

    def __post_init__(self) -> None:
        if self.require_client_certs and not self.enabled:
            raise TopologyError("tls.require_client_certs needs tls.enabled = true")
        if isinstance(self.valid_days, bool) or not isinstance(self.valid_days, int) or not 1 <= self.valid_days <= 3650:
            raise TopologyError(f"tls.valid_days must be an integer in 1..3650, not {self.valid_days!r}")


class Role(str, Enum):
    """What an MQTT account is for; decides its ACL and its credentials folder."""

    DEVICE = "device"
    AGGREGATOR = "aggregator"
    BRIDGE = "bridge"
    MONITOR = "monitor"
    RELEASE = "release"


@dataclass(frozen=True, kw_only=True)
class Account:
    """One MQTT account: ``broker`` is ``"root"`` or the region it authenticates at.

    ``region`` is the region the account belongs to (None for root aggregators
    and the monitor); a bridge belongs to its region but authenticates at the
    root. The monitoring account is the one name with an account at every broker.
    """

    username: str
    role: Role
    broker: str
    region: str | None


@dataclass(frozen=True, kw_only=True)
class Topology:
    """A whole fleet's broker layout; account names are unique across the fleet.

    ``monitor``: the read-only monitoring account (statuses, presence, models,
    bridge states; never updates), present at every broker; None: no such account.
    ``release``: the release tools' account at the root broker (writes release
    metadata and bundle chunks, reads statuses); None: no such account.
    """

    fleet: str
    root: RootBroker
    regions: tuple[Region, ...]
    tls: TlsSettings = field(default_factory=TlsSettings)
    message_size_limit: int = DEFAULT_MESSAGE_SIZE_LIMIT
    topic_prefix: str = "fedge"
    monitor: str | None = DEFAULT_MONITOR
    release: str | None = DEFAULT_RELEASE

    def __post_init__(self) -> None:
        _check_account("fleet", self.fleet)
        try:
            TopicLayout(fleet=self.fleet, root_prefix=self.topic_prefix)
        except ValueError as exc:
            raise TopologyError(str(exc)) from exc
        object.__setattr__(self, "regions", tuple(self.regions))
        if not self.regions:
            raise TopologyError("a topology needs at least one region")
        names = [r.name for r in self.regions]
        if len(set(names)) != len(names):
            raise TopologyError(f"region names must be unique: {names}")
        limit = self.message_size_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= _MAX_MQTT_PAYLOAD:
            raise TopologyError(f"message_size_limit must be an integer in 1..{_MAX_MQTT_PAYLOAD}, not {limit!r}")
        if self.monitor is not None:
            _check_account("monitor account", self.monitor)
        if self.release is not None:
            _check_account("release account", self.release)
        seen: dict[str, Account] = {}
        for account in self.accounts():
            if account.username in seen and not (account.role is Role.MONITOR and seen[account.username].role is Role.MONITOR):
                other = seen[account.username]
                raise TopologyError(
                    f"account name {account.username!r} is used twice "
                    f"({other.role.value} at {other.broker}, {account.role.value} at {account.broker})"
                )
            seen[account.username] = account
        self._check_parents()

    def _check_parents(self) -> None:
        """Every parent is a region of this topology, the parents form a tree (no cycle), and a region with
        children has no devices (its aggregator takes its children's aggregates, not updates)."""
        names = {r.name for r in self.regions}
        for region in self.regions:
            if region.parent is not None and region.parent not in names:
                raise TopologyError(f"region {region.name}: parent {region.parent!r} is not a region of this topology")
            seen = [region.name]
            parent = region.parent
            while parent is not None:
                if parent in seen:
                    raise TopologyError(f"regions {' -> '.join(seen + [parent])} form a cycle; parents must form a tree")
                seen.append(parent)
                parent = self.region(parent).parent
            if region.devices and self.children(region.name):
                raise TopologyError(f"region {region.name} has child regions and devices: put its devices in a region "
                                    "of their own (a middle tier takes aggregates only)")

    def children(self, name: str | None) -> tuple[Region, ...]:
        """The regions whose parent is ``name`` (None or ``"root"``: the regions right below the root)."""
        parent = None if name == ROOT else name
        return tuple(r for r in self.regions if r.parent == parent)

    def descendants(self, name: str) -> tuple[Region, ...]:
        """Every region below region ``name``, depth first."""
        found: list[Region] = []
        for child in self.children(name):
            found += [child, *self.descendants(child.name)]
        return tuple(found)

    def parent_broker(self, region: Region) -> str:
        """The broker ``region`` bridges to: ``"root"`` or its parent region's name."""
        return ROOT if region.parent is None else region.parent

    @property
    def layout(self) -> TopicLayout:
        """The fleet's topic names."""
        return TopicLayout(fleet=self.fleet, root_prefix=self.topic_prefix)

    def region(self, name: str) -> Region:
        """The region called ``name``; KeyError if there is none."""
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(name)

    def address(self, broker: str) -> BrokerAddress:
        """Address of ``"root"`` or of a region's broker."""
        return self.root.address if broker == ROOT else self.region(broker).address

    def accounts(self, broker: str | None = None) -> tuple[Account, ...]:
        """Every account, or only those that authenticate at ``broker`` (``"root"`` or a region)."""
        found = [Account(username=u, role=Role.AGGREGATOR, broker=ROOT, region=None) for u in self.root.aggregators]
        for region in self.regions:
            found.append(Account(username=region.bridge_username, role=Role.BRIDGE, broker=self.parent_broker(region),
                                 region=region.name))
        for region in self.regions:
            found += [
                Account(username=u, role=Role.AGGREGATOR, broker=region.name, region=region.name)
                for u in region.aggregators
            ]
            found += [
                Account(username=u, role=Role.DEVICE, broker=region.name, region=region.name) for u in region.devices
            ]
        if self.monitor is not None:
            found += [Account(username=self.monitor, role=Role.MONITOR, broker=b, region=None)
                      for b in (ROOT, *(r.name for r in self.regions))]
        if self.release is not None:
            found.append(Account(username=self.release, role=Role.RELEASE, broker=ROOT, region=None))
        return tuple(a for a in found if broker is None or a.broker == broker)

    def with_addresses(self, addresses: Mapping[str, BrokerAddress]) -> Topology:
        """A copy with some brokers moved (keys: ``"root"`` or region names), e.g. to free test ports."""
        unknown = set(addresses) - {ROOT, *(r.name for r in self.regions)}
        if unknown:
            raise KeyError(f"no such broker: {sorted(unknown)}")
        root = self.root
        if ROOT in addresses:
            root = dataclasses.replace(root, address=addresses[ROOT])
        regions = tuple(
            dataclasses.replace(r, address=addresses[r.name]) if r.name in addresses else r for r in self.regions
        )
        return dataclasses.replace(self, root=root, regions=regions)


# --- reading topology.toml -------------------------------------------------------------------


class _Table:
    """A TOML table read key by key; leftover keys are reported as typos."""

    def __init__(self, where: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise TopologyError(f"[{where}] must be a table")
        self.where = where
        self._data = dict(data)

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self._data:
            if default is ...:
                raise TopologyError(f"[{self.where}] is missing {key!r}")
            return default
        value = self._data.pop(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise TopologyError(f"[{self.where}] {key} has the wrong type: {value!r}")
        return value

    def take_names(self, key: str, default: Any = ...) -> tuple[str, ...]:
        value = self.take(key, list, default)
        if not all(isinstance(v, str) for v in value):
            raise TopologyError(f"[{self.where}] {key} must be a list of strings")
        return tuple(value)

    def done(self) -> None:
        if self._data:
            raise TopologyError(f"[{self.where}] has unknown keys: {sorted(self._data)}")


def _address(table: _Table) -> BrokerAddress:
    return BrokerAddress(
        host=table.take("host", str),
        port=table.take("port", int, 1883),
        tls_port=table.take("tls_port", int, 8883),
        bind=table.take("bind", str, None),
    )


def _expand_devices(region: str, pattern: str, count: int, start: int) -> tuple[str, ...]:
    fields = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    if "index" not in fields or not fields <= {"index", "region"}:
        raise TopologyError(
            f"device_id_pattern {pattern!r} must use {{index}} and may use {{region}}; no other fields"
        )
    if count < 0 or start < 0:
        raise TopologyError("device_count and device_start must not be negative")
    return tuple(pattern.format(index=i, region=region) for i in range(start, start + count))


def _region(table: _Table) -> Region:
    name = table.take("name", str)
    address = _address(table)
    aggregators = table.take_names("aggregators")
    devices = table.take_names("devices", ())
    parent = table.take("parent", str, None)
    count = table.take("device_count", int, None)
    if count is not None:
        if devices:
            raise TopologyError(f"[{table.where}] gives both devices and device_count; use one")
        devices = _expand_devices(
            name, table.take("device_id_pattern", str, "{region}-dev-{index:04d}"), count, table.take("device_start", int, 1)
        )
    table.done()
    return Region(name=name, address=address, aggregators=aggregators, devices=devices, parent=parent)


def parse_topology(text: str) -> Topology:
    """Parse and validate ``topology.toml`` text; raise TopologyError naming the bad key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"topology is not valid TOML: {exc}") from exc
    top = _Table("topology", data)
    fleet = _Table("fleet", top.take("fleet", dict))
    tls = _Table("tls", top.take("tls", dict, {}))
    root = _Table("root", top.take("root", dict))
    raw_regions = top.take("regions", list)
    monitor = _Table("monitor", top.take("monitor", dict, {}))
    release = _Table("release", top.take("release", dict, {}))
    for section in FLEET_SECTIONS:  # fedge fleet init's; they configure no broker
        top.take(section, dict, None)
    top.done()
    monitor_enabled, monitor_name = monitor.take("enabled", bool, True), monitor.take("username", str, DEFAULT_MONITOR)
    monitor.done()
    release_enabled, release_name = release.take("enabled", bool, True), release.take("username", str, DEFAULT_RELEASE)
    for key in RELEASE_POLICY_KEYS:  # checked and used by fedge fleet init (sdk.release.fleet_setup)
        release.take(key, int, None)
    release.done()

    tls_settings = TlsSettings(
        enabled=tls.take("enabled", bool, False),
        require_client_certs=tls.take("require_client_certs", bool, False),
        valid_days=tls.take("valid_days", int, 825),
    )
    tls.done()
    root_broker = RootBroker(address=_address(root), aggregators=root.take_names("aggregators"))
    root.done()
    regions = tuple(_region(_Table(f"regions[{i}]", raw)) for i, raw in enumerate(raw_regions))
    topology = Topology(
        fleet=fleet.take("name", str),
        topic_prefix=fleet.take("topic_prefix", str, "fedge"),
        message_size_limit=fleet.take("message_size_limit", int, DEFAULT_MESSAGE_SIZE_LIMIT),
        root=root_broker,
        regions=regions,
        tls=tls_settings,
        monitor=monitor_name if monitor_enabled else None,
        release=release_name if release_enabled else None,
    )
    fleet.done()
    return topology


def load_topology(path: Path) -> Topology:
    """Read and validate a ``topology.toml`` file."""
    return parse_topology(Path(path).read_text(encoding="utf-8"))
