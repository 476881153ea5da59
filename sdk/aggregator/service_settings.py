"""The process-level settings of an aggregator service, and their TOML sections.

``[broker]`` (:class:`BrokerSettings`), ``[service]`` (:class:`LoopSettings`),
``[metrics]`` (:class:`MetricsSettings`) and ``[release]`` (:class:`ServiceRelease`)
read the same way in every tier's file; :mod:`sdk.aggregator.service_config`
opens the file and calls the readers here, which raise ConfigError naming the
file and the dotted key. The aggregator's own sections stay with that module.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from device_agent.daemon.toml_table import TomlTable
from device_agent.release.settings import ReleaseSettings
from sdk.aggregator.batching import BatchLimits

_K = TypeVar("_K")


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """How a service reaches its broker (clean MQTT session, paho-managed reconnects).

    ``client_id`` must be unique per process. ``username``/``password`` None:
    anonymous / no password. ``tls_ca_file`` None: plain TCP; ``tls_cert_file``
    and ``tls_key_file`` (mTLS) come together or not at all. ``share_group``
    None subscribes directly instead of through ``$share/<group>/``.
    ``max_packet_size``: the broker's ``message_size_limit``; nothing larger is published.
    """

    host: str
    port: int = 1883
    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    keepalive_s: int = 60
    max_packet_size: int = 5 * 1024 * 1024
    share_group: str | None = None
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file come together or not at all")
        if self.tls_cert_file is not None and self.tls_ca_file is None:
            raise ValueError("a client certificate needs tls_ca_file (TLS on)")
        if not 1 <= self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("reconnect delays must satisfy 1 <= reconnect_min_s <= reconnect_max_s")


@dataclass(frozen=True, kw_only=True)
class LoopSettings:
    """The service loop's cadence and limits.

    ``tick_s`` between close checks, ``flush_every_s`` between counter writes.
    ``resend_min_s``/``resend_max_s``: a region resends its aggregate until the
    root's receipt, after capped exponential backoff between these delays.
    Per sender (a device's account, a region at the root), before anything is
    opened: ``sender_rate_per_s`` messages per second with bursts of
    ``sender_burst`` (None: sized to the model, enough for a chunked update and
    a resend), and ``max_pending_bytes`` over everything waiting (docs/aggregation.md, "Floods").
    Group commit: up to ``batch_max_updates`` queued updates are committed together, waiting at most
    ``batch_max_wait_s`` for more (1 / 0: one commit per update; docs/aggregation.md, "Group commit").
    """

    tick_s: float = 0.2
    flush_every_s: float = 5.0
    resend_min_s: float = 2.0
    resend_max_s: float = 30.0
    sender_rate_per_s: float = 1.0
    sender_burst: int | None = None
    max_pending_bytes: int = 256 * 1024 * 1024
    batch_max_updates: int = BatchLimits.max_updates
    batch_max_wait_s: float = BatchLimits.max_wait_s

    def __post_init__(self) -> None:
        self.batch_limits()  # validates the batch settings
        if not (self.tick_s > 0 and self.flush_every_s > 0):
            raise ValueError("tick_s and flush_every_s must be > 0")
        if not 0 < self.resend_min_s <= self.resend_max_s:
            raise ValueError("resend delays must satisfy 0 < resend_min_s <= resend_max_s")
        if not self.sender_rate_per_s > 0:
            raise ValueError("sender_rate_per_s must be > 0")
        if self.sender_burst is not None and self.sender_burst < 1:
            raise ValueError("sender_burst must be >= 1 or None")
        if self.max_pending_bytes < 1:
            raise ValueError("max_pending_bytes must be >= 1")

    def batch_limits(self) -> BatchLimits:
        """The group-commit limits of the regional service's update batches."""
        return BatchLimits(max_updates=self.batch_max_updates, max_wait_s=self.batch_max_wait_s)


@dataclass(frozen=True, kw_only=True)
class MetricsSettings:
    """Where a service serves ``/metrics`` and ``/healthz`` (docs/operations.md).

    ``bind``: an IP address, loopback by default (the endpoint has no
    authentication: put a proxy with TLS in front, or a monitoring network,
    before binding elsewhere). ``port`` 0 takes any free port (logged).
    """

    bind: str = "127.0.0.1"
    port: int

    def __post_init__(self) -> None:
        check_listen_address(self.bind, self.port)


def check_listen_address(bind: str, port: int) -> None:
    """ValueError unless ``bind`` is an IP address and ``port`` in 0..65535 (0: any free port)."""
    try:
        ipaddress.ip_address(bind)
    except ValueError as exc:
        raise ValueError(f"bind must be an IP address, got {bind!r}") from exc
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")


@dataclass(frozen=True, kw_only=True)
class ServiceRelease:
    """The ``[release]`` table: follow the fleet's releases (docs/rollout.md).

    ``settings``: the TUF trust anchor (``root_file``) and download pacing.
    ``library``: where verified bundles are kept (default ``<store>.bundles``);
    ``state_dir``: the release client's metadata and downloads (``<store>.release``).
    ``bundle`` and ``fleet_public_key``: the configured bundle and the key bundles must be signed with.
    """

    settings: ReleaseSettings
    library: Path
    state_dir: Path
    bundle: Path
    fleet_public_key: Path


# -- the sections -------------------------------------------------------------------------


def build_checked(table: TomlTable, key: str, cls: Callable[..., _K], values: dict[str, Any]) -> _K:
    """``cls(**values)``; the dataclass's own (cross-field) checks become a ConfigError naming ``key`` of ``table``."""
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise table.error(key, str(exc)) from exc


def read_broker(top: TomlTable, *, default_client_id: str) -> BrokerSettings:
    """``[broker]`` and its ``[broker.tls]``: ``host`` required, a password inline or from ``password_file``."""
    table = top.table("broker")
    tls = table.section("tls")
    password = table.string("password", None)
    password_file = table.path("password_file", None, must_exist=True)
    if password is not None and password_file is not None:
        raise table.error("password_file", "give password or password_file, not both")
    if password_file is not None:
        lines = password_file.read_text(encoding="utf-8").splitlines()
        password = lines[0] if lines else ""
    share_group = table.string("share_group", None)
    if share_group is not None and any(ch in share_group for ch in "/+#"):
        raise table.error("share_group", f"{share_group!r} must be one topic segment")
    reconnect_min_s = table.integer("reconnect_min_s", 1, minimum=1)
    reconnect_max_s = table.integer("reconnect_max_s", 30, minimum=reconnect_min_s)
    settings = build_checked(tls, "cert_file", BrokerSettings, dict(
        host=table.string("host"),
        port=table.integer("port", 1883, minimum=1, maximum=65535),
        client_id=table.string("client_id", default_client_id),
        username=table.string("username", None),
        password=password,
        tls_ca_file=tls.path("ca_file", None, must_exist=True),
        tls_cert_file=tls.path("cert_file", None, must_exist=True),
        tls_key_file=tls.path("key_file", None, must_exist=True),
        keepalive_s=table.integer("keepalive_s", 60, minimum=5),
        max_packet_size=table.integer("max_packet_size", 5 * 1024 * 1024, minimum=1024),
        share_group=share_group,
        reconnect_min_s=reconnect_min_s,
        reconnect_max_s=reconnect_max_s,
    ))
    tls.done()
    table.done()
    return settings


def read_loop(top: TomlTable) -> LoopSettings:
    """``[service]``: every key optional; the defaults are :class:`LoopSettings`'s."""
    table = top.section("service")
    defaults = LoopSettings()
    resend_min_s = table.number("resend_min_s", defaults.resend_min_s, positive=True)
    batch_wait_s = table.number("batch_max_wait_s", defaults.batch_max_wait_s, minimum=0.0)
    if batch_wait_s > 1.0:
        raise table.error("batch_max_wait_s", f"must be at most 1 s (a receipt waits that long), got {batch_wait_s}")
    settings = build_checked(table, "resend_max_s", LoopSettings, dict(
        tick_s=table.number("tick_s", defaults.tick_s, positive=True),
        flush_every_s=table.number("flush_every_s", defaults.flush_every_s, positive=True),
        resend_min_s=resend_min_s,
        resend_max_s=table.number("resend_max_s", max(defaults.resend_max_s, resend_min_s), positive=True),
        sender_rate_per_s=table.number("sender_rate_per_s", defaults.sender_rate_per_s, positive=True),
        sender_burst=table.integer("sender_burst", None, minimum=1),
        max_pending_bytes=table.integer("max_pending_bytes", defaults.max_pending_bytes, minimum=1024),
        batch_max_updates=table.integer("batch_max_updates", defaults.batch_max_updates, minimum=1, maximum=4096),
        batch_max_wait_s=batch_wait_s,
    ))
    table.done()
    return settings


def read_metrics(top: TomlTable) -> MetricsSettings | None:
    """``[metrics]``: ``port`` (required in the section) and ``bind``; None when the section is absent."""
    table = top.optional_table("metrics")
    if table is None:
        return None
    settings = build_checked(table, "bind", MetricsSettings, dict(
        bind=table.string("bind", "127.0.0.1"),
        port=table.integer("port", minimum=0, maximum=65535),
    ))
    table.done()
    return settings


def read_release(top: TomlTable, *, store: Path, bundle: Path, fleet_public_key: Path) -> ServiceRelease | None:
    """``[release]``: absent, the service runs its configured bundle for good."""
    table = top.optional_table("release")
    if table is None:
        return None
    settings = build_checked(table, "root_file", ReleaseSettings, dict(
        root_file=table.path("root_file", must_exist=True),
        window=table.integer("window", 8, minimum=1, maximum=64),
        chunks_per_s=table.number("chunks_per_second", 100.0, positive=True),
        chunk_timeout_s=table.number("chunk_timeout_s", 15.0, positive=True),
        settle_s=table.number("settle_s", 0.5, minimum=0.0),
        recheck_s=table.number("recheck_s", 300.0, positive=True),
    ))
    library = table.path("library", store.with_name(store.name + ".bundles"))
    table.done()
    return ServiceRelease(settings=settings, library=library, state_dir=store.with_name(store.name + ".release"),
                          bundle=bundle, fleet_public_key=fleet_public_key)
