"""Configuration of the aggregator services: one TOML file per process, parsed and validated here only.

Every problem raises :class:`~device_agent.daemon.errors.ConfigError` naming
the file and the dotted key (``regional.toml: round.quorum: expected an
integer in 1.., got 0``); unknown keys are errors too. Relative paths resolve
against the config file's directory. The shared-parameter spec and the bundle
version come from the signed bundle (verified with the fleet key), so an
aggregator can never disagree with the devices about what an update holds.
Keys are PEM files (``fedge keys generate``); the devices' (or regions')
Ed25519 public keys are the ``<id>.pub`` files of one directory, minus the
key ids in its ``revoked.txt`` (:class:`~sdk.aggregator.registry.KeyRegistry`,
re-read on SIGHUP by ``fedge aggregator``).
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from device_agent.bundle.archive import verify_bundle
from device_agent.bundle.manifest import BundleManifest
from device_agent.compression.spec import CompressionSpec
from device_agent.daemon.errors import ConfigError
from device_agent.daemon.toml_table import REQUIRED, TomlTable
from device_agent.errors import BundleError
from device_agent.keys import load_encryption_key, load_recipient_key, load_signing_key, load_verify_key
from device_agent.protocol.headers import MAX_CANDIDATES
from device_agent.release.settings import ReleaseSettings
from sdk.aggregation import AggregationConfig
from sdk.aggregation.influence import MAX_SAMPLE_COUNT, InfluencePolicy
from sdk.aggregator.batching import BatchLimits
from sdk.aggregator.downlink import DownlinkSettings, UplinkSchedule
from sdk.aggregator.middle import MiddleConfig
from sdk.aggregator.regional import RegionalConfig
from sdk.aggregator.registry import KeyRegistry, RegistryError
from sdk.aggregator.root import RootConfig
from sdk.aggregator.round_state import RoundPolicy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

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


@dataclass(frozen=True, kw_only=True)
class RegionalServiceConfig:
    """Everything ``fedge aggregator regional`` needs: the aggregator, its store and member name, broker, loop,
    metrics endpoint (None: none), and (``release``; None: the configured bundle for good) how it follows releases."""

    aggregator: RegionalConfig
    store: Path
    member: str = "main"
    broker: BrokerSettings
    loop: LoopSettings = LoopSettings()
    metrics: MetricsSettings | None = None
    release: ServiceRelease | None = None
    downlink: DownlinkSettings = DownlinkSettings()


@dataclass(frozen=True, kw_only=True)
class RootServiceConfig:
    """Everything ``fedge aggregator root`` needs; round 0's initial shared weights come from ``bundle``
    (verified with ``fleet_public_key``)."""

    aggregator: RootConfig
    store: Path
    member: str = "main"
    broker: BrokerSettings
    loop: LoopSettings = LoopSettings()
    metrics: MetricsSettings | None = None
    bundle: Path
    fleet_public_key: Path
    release: ServiceRelease | None = None


def load_regional_service_config(path: str | Path) -> RegionalServiceConfig:
    """Read and validate a regional service's TOML file (see docs/aggregation.md, "Running the services")."""
    top = _open_toml(Path(path))
    agg = top.table("aggregator")
    fleet, region = agg.identifier("fleet"), agg.identifier("region")
    manifest = _manifest(agg)
    config = _build(agg, "regional_weight", RegionalConfig, dict(
        fleet=fleet,
        region=region,
        device_keys=_public_keys_dir(agg, "device_keys_dir", what="device"),
        **_parent(agg),
        regional_weight=agg.number("regional_weight", 0.0, minimum=0.0),
        fomo_candidates=agg.integer("fomo_candidates", 0, minimum=0, maximum=MAX_CANDIDATES),
        aggregation=_aggregation(top),
        influence=_influence(top),
        **_common(top, agg, manifest),
    ))
    downlink = _downlink(top)
    if downlink.compression.enabled and config.fomo_candidates:
        raise agg.error("fomo_candidates", "FedFomo cannot be combined with [downlink] compression (docs/protocol.md)")
    return _region_like_service(top, agg, config, fleet=fleet, region=region, downlink=downlink)


def load_root_service_config(path: str | Path) -> RootServiceConfig:
    """Read and validate the root service's TOML file (see docs/aggregation.md, "Running the services")."""
    top = _open_toml(Path(path))
    agg = top.table("aggregator")
    fleet = agg.identifier("fleet")
    manifest = _manifest(agg)
    region_keys = _public_keys_dir(agg, "region_keys_dir", what="region")
    weighting = agg.string("weighting", "samples")
    if weighting not in ("samples", "uniform"):
        raise agg.error("weighting", f"expected 'samples' or 'uniform', got {weighting!r}")
    config = _build(agg, "root_id", RootConfig, dict(
        fleet=fleet,
        region_keys=region_keys,
        root_id=agg.string("root_id", "root"),
        weighting=weighting,
        **_common(top, agg, manifest, default_quorum=len(region_keys), root=True),
    ))
    store = agg.path("store")
    member = agg.string("member", "main")
    bundle = agg.path("bundle")
    broker = _broker(top, default_client_id=f"fedge-{fleet}-root-{member}")
    loop = _loop(top)
    metrics = _metrics(top)
    release = _release(top, store=store, bundle=bundle, fleet_public_key=agg.path("fleet_public_key"))
    agg.done()
    top.done()
    return RootServiceConfig(aggregator=config, store=store, member=member, broker=broker, loop=loop, metrics=metrics,
                             bundle=bundle, fleet_public_key=agg.path("fleet_public_key"), release=release)


# -- pieces ---------------------------------------------------------------------------------


def _open_toml(path: Path) -> TomlTable:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        # Found by fuzzing (tests/fuzz): non-UTF-8 bytes, and tomllib recursing once per nesting level.
        raise ConfigError(f"{path}: not valid TOML: {str(exc) or type(exc).__name__}") from exc
    return TomlTable(data, prefix="", source=path.name, base_dir=path.parent.resolve())


def _build(table: TomlTable, key: str, cls: Callable[..., _K], values: dict[str, Any]) -> _K:
    """``cls(**values)``; the dataclass's own (cross-field) checks become a ConfigError naming ``key`` of ``table``."""
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise table.error(key, str(exc)) from exc


def _manifest(agg: TomlTable) -> BundleManifest:
    bundle = agg.path("bundle", must_exist=True)
    fleet_key = _key(agg, "fleet_public_key", load_verify_key)
    try:
        return verify_bundle(bundle, fleet_key)
    except BundleError as exc:
        raise agg.error("bundle", f"{bundle} does not verify with the fleet key: {exc}") from exc


def _common(top: TomlTable, agg: TomlTable, manifest: BundleManifest, *, default_quorum: int | None = None,
            root: bool = False) -> dict[str, Any]:
    """The :class:`~sdk.aggregator.config.AggregatorConfig` fields both tiers read the same way
    (``root``: ``round.min_updates`` defaults to 0 and must stay 0)."""
    round_table = top.table("round")
    quorum = round_table.integer("quorum", REQUIRED if default_quorum is None else default_quorum, minimum=1)
    min_updates = round_table.integer("min_updates", 0 if root else 1, minimum=0, maximum=0 if root else None)
    policy = _build(round_table, "min_updates", RoundPolicy, dict(
        quorum=quorum,
        deadline_s=round_table.number("deadline_s", positive=True),
        min_updates=min_updates,
    ))
    round_table.done()
    norm_bound = agg.number("norm_bound", None, positive=True)
    return dict(
        encryption_key=_key(agg, "encryption_key", load_encryption_key),
        signing_key=_key(agg, "signing_key", load_signing_key),
        spec=manifest.shared_spec(),
        bundle_version=manifest.bundle_version,
        policy=policy,
        norm_bound=norm_bound,
        replay_rounds=agg.integer("replay_rounds", 8, minimum=1),
    )


def _aggregation(top: TomlTable) -> AggregationConfig:
    table = top.section("aggregation")
    rule = table.string("rule", "mean")
    if rule not in ("mean", "median", "trimmed_mean"):
        raise table.error("rule", f"expected 'mean', 'median' or 'trimmed_mean', got {rule!r}")
    if table.number("clip_norm", None, positive=True) is not None:
        raise table.error("clip_norm", "norms are bounded in [influence] (norm = \"fixed\", norm_bound = ...); "
                                       "see docs/security.md")
    config = _build(table, "trim_fraction", AggregationConfig, dict(
        rule=rule,
        trim_fraction=table.number("trim_fraction", 0.1, minimum=0.0),
    ))
    table.done()
    return config


def _influence(top: TomlTable) -> InfluencePolicy:
    """``[influence]``: every key optional; the defaults are :class:`InfluencePolicy`'s (docs/security.md)."""
    table = top.section("influence")
    defaults = InfluencePolicy()
    norm = table.string("norm", defaults.norm)
    if norm not in ("adaptive", "fixed", "unbounded"):
        raise table.error("norm", f"expected 'adaptive', 'fixed' or 'unbounded' (unsafe), got {norm!r}")
    weight = table.string("weight", defaults.weight)
    if weight not in ("adaptive", "fixed"):
        raise table.error("weight", f"expected 'adaptive' or 'fixed', got {weight!r}")
    policy = _build(table, "norm", InfluencePolicy, dict(
        norm=norm,
        norm_bound=table.number("norm_bound", defaults.norm_bound, positive=True),
        norm_quantile=table.number("norm_quantile", defaults.norm_quantile, positive=True),
        norm_multiplier=table.number("norm_multiplier", defaults.norm_multiplier, positive=True),
        weight=weight,
        max_sample_count=table.integer("max_sample_count", defaults.max_sample_count, minimum=1, maximum=MAX_SAMPLE_COUNT),
        weight_multiplier=table.number("weight_multiplier", defaults.weight_multiplier, positive=True),
        min_history=table.integer("min_history", defaults.min_history, minimum=1),
    ))
    table.done()
    return policy


def _broker(top: TomlTable, *, default_client_id: str) -> BrokerSettings:
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
    settings = _build(tls, "cert_file", BrokerSettings, dict(
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


def _loop(top: TomlTable) -> LoopSettings:
    table = top.section("service")
    defaults = LoopSettings()
    resend_min_s = table.number("resend_min_s", defaults.resend_min_s, positive=True)
    batch_wait_s = table.number("batch_max_wait_s", defaults.batch_max_wait_s, minimum=0.0)
    if batch_wait_s > 1.0:
        raise table.error("batch_max_wait_s", f"must be at most 1 s (a receipt waits that long), got {batch_wait_s}")
    settings = _build(table, "resend_max_s", LoopSettings, dict(
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


def _metrics(top: TomlTable) -> MetricsSettings | None:
    """``[metrics]``: ``port`` (required in the section) and ``bind``; None when the section is absent."""
    table = top.optional_table("metrics")
    if table is None:
        return None
    settings = _build(table, "bind", MetricsSettings, dict(
        bind=table.string("bind", "127.0.0.1"),
        port=table.integer("port", minimum=0, maximum=65535),
    ))
    table.done()
    return settings


def _downlink(top: TomlTable) -> DownlinkSettings:
    """``[downlink]`` of a regional service: ``compression`` (model deltas down; default ``none``) and ``uplink``
    (the round-by-round uplink override, e.g. ``"0:q8,10:topk:0.3+q4"``; default: the bundle decides)."""
    table = top.optional_table("downlink")
    if table is None:
        return DownlinkSettings()
    values: dict[str, Any] = {}
    for key, parse in (("compression", CompressionSpec.parse), ("uplink", UplinkSchedule.parse)):
        text = table.string(key, None)
        if text is not None:
            try:
                values[key] = parse(text)
            except ValueError as exc:
                raise table.error(key, str(exc)) from exc
    table.done()
    return DownlinkSettings(**values)


def _release(top: TomlTable, *, store: Path, bundle: Path, fleet_public_key: Path) -> ServiceRelease | None:
    """``[release]``: absent, the service runs its configured bundle for good."""
    table = top.optional_table("release")
    if table is None:
        return None
    settings = _build(table, "root_file", ReleaseSettings, dict(
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


def _key(table: TomlTable, key: str, load: Callable[[Path], _K]) -> _K:
    path = table.path(key, must_exist=True)
    try:
        return load(path)
    except (OSError, ValueError) as exc:
        raise table.error(key, f"cannot load {path}: {exc}") from exc


def _public_keys_dir(table: TomlTable, key: str, *, what: str) -> KeyRegistry:
    """The reloadable registry of the ``<id>.pub`` files of a directory (:class:`KeyRegistry`)."""
    directory = table.path(key)
    if not directory.is_dir():
        raise table.error(key, f"{str(directory)!r} is not a directory")
    try:
        return KeyRegistry(directory, what=what)
    except RegistryError as exc:
        raise table.error(key, str(exc)) from exc


def load_middle_service_config(path: str | Path) -> RegionalServiceConfig:
    """Read and validate a middle tier's TOML file (docs/aggregation.md, "Any depth"): a regional file whose
    ``[aggregator]`` names ``child_keys_dir`` instead of ``device_keys_dir`` and has no FedFomo, ``[aggregation]``
    or ``[influence]``; ``round.quorum`` defaults to the number of children."""
    top = _open_toml(Path(path))
    agg = top.table("aggregator")
    fleet, region = agg.identifier("fleet"), agg.identifier("region")
    manifest = _manifest(agg)
    children = _public_keys_dir(agg, "child_keys_dir", what="child tier")
    config = _build(agg, "regional_weight", MiddleConfig, dict(
        fleet=fleet,
        region=region,
        device_keys=children,
        **_parent(agg),
        regional_weight=agg.number("regional_weight", 0.0, minimum=0.0),
        **_common(top, agg, manifest, default_quorum=max(1, len(children))),
    ))
    return _region_like_service(top, agg, config, fleet=fleet, region=region)


def _region_like_service(top: TomlTable, agg: TomlTable, config: RegionalConfig, *, fleet: str, region: str,
                         downlink: DownlinkSettings = DownlinkSettings()) -> RegionalServiceConfig:
    """The service settings a region and a middle tier share (store, member, broker, loop, metrics, release)."""
    store = agg.path("store")
    member = agg.string("member", "main")
    broker = _broker(top, default_client_id=f"fedge-{fleet}-{region}-{member}")
    loop = _loop(top)
    metrics = _metrics(top)
    release = _release(top, store=store, bundle=agg.path("bundle"), fleet_public_key=agg.path("fleet_public_key"))
    agg.done()
    top.done()
    return RegionalServiceConfig(aggregator=config, store=store, member=member, broker=broker, loop=loop, metrics=metrics,
                                 release=release, downlink=downlink)


def _parent(agg: TomlTable) -> dict[str, Any]:
    """The tier above: ``parent`` (its id; absent: the root) and its keys, ``parent_verify_key`` and
    ``parent_encryption_key`` or, the names two-level files use, ``root_verify_key`` and ``root_encryption_key``."""
    parent = agg.string("parent", None)
    if parent is not None:
        parent = agg.identifier("parent")
    keys: dict[str, Any] = {"parent": parent}
    for field_name, new_name, load in (("root_verify_key", "parent_verify_key", load_verify_key),
                                       ("root_encryption_key", "parent_encryption_key", load_recipient_key)):
        given = [name for name in (new_name, field_name) if agg.value(name, None) is not None]
        if len(given) == 2:
            raise agg.error(new_name, f"give {new_name} or {field_name}, not both")
        keys[field_name] = _key(agg, given[0] if given else new_name, load)
    return keys
