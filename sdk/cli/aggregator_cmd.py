"""``fedge aggregator``: run the regional and root aggregator services on MQTT.

Both log at INFO by default (start, broker connections, rounds, forwarding)
and serve ``/metrics`` and ``/healthz`` when their TOML has a ``[metrics]``
section (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import FrameType

import click
import numpy as np

from device_agent.compression.spec import CompressionSpec
from device_agent.daemon.errors import ConfigError
from device_agent.errors import FedgeError
from device_agent.keys import load_verify_key
from device_agent.protocol.topics import TopicLayout
from sdk.aggregator import RegionalAggregator, RootAggregator
from sdk.aggregator.bundles import BundleLibrary, initial_shared_weights
from sdk.aggregator.downlink import UplinkSchedule
from sdk.aggregator.follower import VersionFollower
from sdk.aggregator.metrics_endpoint import MetricsEndpoint
from sdk.aggregator.mqtt_service import MqttAggregatorService, RegionalService, RootService, ServiceReport
from sdk.aggregator.registry import KeyRegistry
from sdk.aggregator.service_config import (
    RegionalServiceConfig,
    MetricsSettings,
    RootServiceConfig,
    ServiceRelease,
    load_regional_service_config,
    load_root_service_config,
)
from sdk.aggregator.tier import AggregatorTier
from sdk.cli.family import InputError, examples, service_logging

logger = logging.getLogger(__name__)
_CONFIG = click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
                       help="The service's TOML file (docs/aggregation.md, 'Running the services').")
_MAX_SECONDS = click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
                            help="Stop after this long (default: run until SIGINT/SIGTERM).")


@click.group()
def aggregator() -> None:
    """Run a region's, a middle tier's or the root's aggregator as an MQTT service."""


@aggregator.command("regional", epilog=examples("fedge aggregator regional --config eu-aggregator.toml",
                                                "fedge aggregator regional --config eu-aggregator.toml --log-format json",
                                                "fedge aggregator regional --config eu-aggregator.toml --max-seconds 600 -q",
                                                "fedge aggregator regional --config eu-aggregator.toml --downlink-compression q4 "
                                                "--uplink-compression 0:q8,10:topk:0.3+q4"))
@_CONFIG
@_MAX_SECONDS
@click.option("--downlink-compression", default=None, metavar="SPEC",
              help="Send models down as compressed deltas (q8, q4, topk:F+q4...; none: full models); overrides [downlink].")
@click.option("--uplink-compression", default=None, metavar="SCHEDULE",
              help="The devices' uplink compression by round (q8, or 0:q8,10:topk:0.3+q4), overriding the bundle's; "
                   "overrides [downlink] uplink.")
@click.pass_context
def regional(ctx: click.Context, config_path: Path, max_seconds: float | None, downlink_compression: str | None,
             uplink_compression: str | None) -> None:
    """Serve one region: device updates in, receipts and the region's model out, aggregates to the root."""
    service_logging(ctx)
    try:
        settings = _with_downlink(load_regional_service_config(config_path), downlink_compression, uplink_compression)
        layout = TopicLayout(fleet=settings.aggregator.fleet)
        with RegionalAggregator.open(settings.store, settings.aggregator, member=settings.member) as agg:
            follower = follow_releases(settings.release, agg, layout=layout, identity=settings.broker.client_id,
                                       region=settings.aggregator.region)
            service = RegionalService(agg, region=settings.aggregator.region, layout=layout,
                                      broker=settings.broker, loop=settings.loop, follower=follower,
                                      downlink=settings.downlink,
                                      downlink_state=settings.store.with_name(settings.store.name + ".downlink"))
            logger.info("regional aggregator %s of fleet %s: store %s, bundle v%d, quorum %d, deadline %g s",
                        settings.aggregator.region, settings.aggregator.fleet, settings.store,
                        agg.bundle_version, settings.aggregator.policy.quorum,
                        settings.aggregator.policy.deadline_s)
            _serve(service, settings.metrics, max_seconds, reload=settings.aggregator.device_keys)
    except (ConfigError, FedgeError) as exc:
        raise click.ClickException(str(exc)) from exc


def _with_downlink(settings: RegionalServiceConfig, downlink: str | None, uplink: str | None) -> RegionalServiceConfig:
    """The config with the command line's ``--downlink-compression`` / ``--uplink-compression`` applied."""
    changes = {}
    for name, text, parse in (("compression", downlink, CompressionSpec.parse), ("uplink", uplink, UplinkSchedule.parse)):
        if text is not None:
            try:
                changes[name] = parse(text)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=f"--{'downlink' if name == 'compression' else 'uplink'}-compression")
    return replace(settings, downlink=replace(settings.downlink, **changes)) if changes else settings


@aggregator.command("root", epilog=examples("fedge aggregator root --config root-aggregator.toml",
                                            "fedge aggregator root --config root-aggregator.toml --log-format json"))
@_CONFIG
@_MAX_SECONDS
@click.pass_context
def root(ctx: click.Context, config_path: Path, max_seconds: float | None) -> None:
    """Serve the root: regions' aggregates in, the signed global model out (round 0 from the bundle)."""
    service_logging(ctx)
    try:
        settings = load_root_service_config(config_path)
        layout = TopicLayout(fleet=settings.aggregator.fleet)
        with RootAggregator.open(settings.store, settings.aggregator, member=settings.member) as agg:
            initial = initial_shared_params(settings) if agg.current_model() is None else None
            follower = follow_releases(settings.release, agg, layout=layout, identity=settings.broker.client_id, region=None)
            service = RootService(agg, layout=layout, broker=settings.broker, loop=settings.loop, initial_params=initial,
                                  follower=follower)
            logger.info("root aggregator of fleet %s: store %s, bundle v%d, quorum %d of the regions, deadline %g s",
                        settings.aggregator.fleet, settings.store, agg.bundle_version,
                        settings.aggregator.policy.quorum,
                        settings.aggregator.policy.deadline_s)
            _serve(service, settings.metrics, max_seconds, reload=settings.aggregator.region_keys)
    except (ConfigError, FedgeError) as exc:
        raise click.ClickException(str(exc)) from exc


@aggregator.command("middle", epilog=examples("fedge aggregator middle --config eu-middle.toml"))
@_CONFIG
@_MAX_SECONDS
@click.pass_context
def middle(ctx: click.Context, config_path: Path, max_seconds: float | None) -> None:
    """Serve a middle tier: its children's aggregates in, receipts and its model out, one aggregate to its parent."""
    from sdk.aggregator.middle import MiddleAggregator
    from sdk.aggregator.middle_service import MiddleService
    from sdk.aggregator.service_config import load_middle_service_config

    service_logging(ctx)
    try:
        settings = load_middle_service_config(config_path)
        layout = TopicLayout(fleet=settings.aggregator.fleet)
        with MiddleAggregator.open(settings.store, settings.aggregator, member=settings.member) as agg:
            follower = follow_releases(settings.release, agg, layout=layout, identity=settings.broker.client_id,
                                       region=settings.aggregator.region)
            service = MiddleService(agg, region=settings.aggregator.region, layout=layout, broker=settings.broker,
                                    loop=settings.loop, follower=follower)
            logger.info("middle aggregator %s of fleet %s (parent %s): store %s, bundle v%d, quorum %d, deadline %g s",
                        settings.aggregator.region, settings.aggregator.fleet, settings.aggregator.parent or "root",
                        settings.store, agg.bundle_version, settings.aggregator.policy.quorum,
                        settings.aggregator.policy.deadline_s)
            _serve(service, settings.metrics, max_seconds, reload=settings.aggregator.device_keys)
    except (ConfigError, FedgeError) as exc:
        raise click.ClickException(str(exc)) from exc


def follow_releases(release: ServiceRelease | None, agg: AggregatorTier, *, layout: TopicLayout, identity: str,
                    region: str | None) -> VersionFollower | None:
    """The service's release follower (None without ``[release]``), after putting ``agg`` on the bundle version
    its stored round runs (a restart after a switch); FedgeError when that bundle is not in the library."""
    if release is None:
        return None
    keys = load_verify_key(release.fleet_public_key)
    library = BundleLibrary(release.library, keys, configured=release.bundle)
    stored = agg.stored_version()
    if stored is not None and stored != agg.bundle_version:
        if library.get(stored) is None:
            raise FedgeError(f"the store runs bundle v{stored} but neither the configured bundle nor the library "
                             f"({release.library}) has it")
        agg.adopt(library.config_for(agg.config, stored))
    return VersionFollower(release.settings, fleet=layout.fleet, identity=identity, region=region,
                           directory=release.state_dir, layout=layout, library=library, fleet_keys=keys,
                           configured_version=library.configured_version)


def _serve(service: MqttAggregatorService, metrics: MetricsSettings | None, max_seconds: float | None, *,
           reload: object = None) -> None:
    """Run ``service`` until a signal or ``max_seconds``, with its metrics endpoint when configured
    (``reload``: the key registry SIGHUP re-reads, see :func:`_stop_on_signals`)."""
    with contextlib.ExitStack() as stack:
        if metrics is not None:
            try:
                endpoint = MetricsEndpoint(host=metrics.bind, port=metrics.port, registry=service.metrics.registry,
                                           health=service.health)
            except OSError as exc:
                raise InputError(f"[metrics] {metrics.bind}:{metrics.port}: cannot listen: {exc.strerror or exc}") from exc
            stack.callback(endpoint.close)
            endpoint.start()
        stop = stack.enter_context(_stop_on_signals(reload=reload))
        _report(service.run(stop, max_seconds))


def initial_shared_params(settings: RootServiceConfig) -> dict[str, np.ndarray]:
    """The bundle's initial shared weights (round 0's global model), read through ONNX Runtime from its checkpoint."""
    return initial_shared_weights(settings.bundle, load_verify_key(settings.fleet_public_key))


@contextlib.contextmanager
def _stop_on_signals(reload: object = None) -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM (so the service disconnects and writes its counters); handlers restored after.

    SIGHUP re-reads the key registry ``reload`` (a :class:`KeyRegistry`; others are read once) in a short-lived
    thread, so the service loop never waits for the disk: ``fedge fleet add/remove/rekey/move`` then apply at once.
    """
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def hangup(signum: int, frame: FrameType | None) -> None:
        if isinstance(reload, KeyRegistry):
            threading.Thread(target=reload.reload, name="fedge-registry-reload", daemon=True).start()
        else:
            logger.warning("SIGHUP: this service's keys are not a registry directory; nothing to reload")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, hangup)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _report(report: ServiceReport) -> None:
    dropped = ", ".join(f"{name}={n}" for name, n in sorted(report.counters.items())) or "none"
    click.echo(f"stopped ({report.ended_by}) after {report.connects} connection(s); dropped by the service: {dropped}")
