"""Configuration of the aggregator services: one TOML file per process, parsed and validated here only.

The process-level sections every tier reads the same way (``[broker]``,
``[service]``, ``[metrics]``, ``[release]``) and their settings live in
:mod:`sdk.aggregator.service_settings`; they are re-exported here.

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

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from device_agent.bundle.archive import verify_bundle
from device_agent.bundle.manifest import BundleManifest
from device_agent.compression.spec import CompressionSpec
from device_agent.protocol.frame_versions import check_frame_policy, parse_frame_versions
from device_agent.daemon.errors import ConfigError
from device_agent.daemon.toml_table import REQUIRED, TomlTable
from device_agent.errors import BundleError
from device_agent.keys import load_encryption_key, load_recipient_key, load_signing_key, load_verify_key
from device_agent.protocol.headers import MAX_CANDIDATES
from sdk.aggregation import AggregationConfig
from sdk.aggregation.influence import MAX_SAMPLE_COUNT, InfluencePolicy
from sdk.aggregator.downlink import DownlinkSettings, UplinkSchedule
from sdk.aggregator.middle import MiddleConfig
from sdk.aggregator.regional import RegionalConfig
from sdk.aggregator.registry import KeyRegistry, RegistryError
from sdk.aggregator.root import RootConfig
from sdk.aggregator.round_state import RoundPolicy
from sdk.aggregator.service_settings import (
    BrokerSettings,
    LoopSettings,
    MetricsSettings,
    ServiceRelease,
    build_checked,
    check_listen_address,
    read_broker,
    read_loop,
    read_metrics,
    read_release,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "BrokerSettings", "LoopSettings", "MetricsSettings", "RegionalServiceConfig", "RootServiceConfig", "ServiceRelease",
    "announces_frames", "check_listen_address", "load_middle_service_config", "load_regional_service_config",
    "load_root_service_config",
]
_K = TypeVar("_K")


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
    config = build_checked(agg, "regional_weight", RegionalConfig, dict(
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
    config = build_checked(agg, "root_id", RootConfig, dict(
        fleet=fleet,
        region_keys=region_keys,
        root_id=agg.string("root_id", "root"),
        weighting=weighting,
        **_common(top, agg, manifest, default_quorum=len(region_keys), root=True),
    ))
    store = agg.path("store")
    member = agg.string("member", "main")
    bundle = agg.path("bundle")
    broker = read_broker(top, default_client_id=f"fedge-{fleet}-root-{member}")
    loop = read_loop(top)
    metrics = read_metrics(top)
    release = read_release(top, store=store, bundle=bundle, fleet_public_key=agg.path("fleet_public_key"))
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
    policy = build_checked(round_table, "min_updates", RoundPolicy, dict(
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
        **_frames(agg),
    )


def announces_frames(path: str | Path) -> bool:
    """Whether the service file at ``path`` announces its frame versions (its ``[aggregator]`` read as the service reads it;
    ConfigError when the file is unreadable or its frame keys are bad)."""
    return bool(_frames(_open_toml(Path(path)).table("aggregator"))["announce_frames"])


def _frames(agg: TomlTable) -> dict[str, Any]:
    """``update_frames`` (default ``"1,2"``) and ``announce_frames`` (default false): docs/protocol.md, "Frames"."""
    text = agg.string("update_frames", "1,2")
    try:
        frames = parse_frame_versions(text)
    except ValueError as exc:
        raise agg.error("update_frames", str(exc)) from None
    announce = agg.value("announce_frames", False)
    if not isinstance(announce, bool):
        raise agg.error("announce_frames", f"expected true or false, got {announce!r}")
    try:
        check_frame_policy(frames, announce)
    except ValueError as exc:
        raise agg.error("update_frames", str(exc)) from None
    return dict(update_frames=frames, announce_frames=announce)


def _aggregation(top: TomlTable) -> AggregationConfig:
    table = top.section("aggregation")
    rule = table.string("rule", "mean")
    if rule not in ("mean", "median", "trimmed_mean"):
        raise table.error("rule", f"expected 'mean', 'median' or 'trimmed_mean', got {rule!r}")
    if table.number("clip_norm", None, positive=True) is not None:
        raise table.error("clip_norm", "norms are bounded in [influence] (norm = \"fixed\", norm_bound = ...); "
                                       "see docs/security.md")
    config = build_checked(table, "trim_fraction", AggregationConfig, dict(
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
    policy = build_checked(table, "norm", InfluencePolicy, dict(
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
    config = build_checked(agg, "regional_weight", MiddleConfig, dict(
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
    broker = read_broker(top, default_client_id=f"fedge-{fleet}-{region}-{member}")
    loop = read_loop(top)
    metrics = read_metrics(top)
    release = read_release(top, store=store, bundle=agg.path("bundle"), fleet_public_key=agg.path("fleet_public_key"))
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
