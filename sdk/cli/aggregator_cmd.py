"""``fedge aggregator``: run the regional and root aggregator services on MQTT."""

from __future__ import annotations

import contextlib
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import click
import numpy as np

from device_agent.bundle.archive import install_bundle
from device_agent.daemon.errors import ConfigError
from device_agent.errors import FedgeError
from device_agent.keys import load_verify_key
from device_agent.protocol.topics import TopicLayout
from device_agent.trainer import DeviceTrainer
from sdk.aggregator import RegionalAggregator, RootAggregator
from sdk.aggregator.mqtt_service import RegionalService, RootService, ServiceReport
from sdk.cli.family import examples
from sdk.aggregator.service_config import (
    RootServiceConfig,
    load_regional_service_config,
    load_root_service_config,
)

_CONFIG = click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
                       help="The service's TOML file (docs/aggregation.md, 'Running the services').")
_MAX_SECONDS = click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
                            help="Stop after this long (default: run until SIGINT/SIGTERM).")


@click.group()
def aggregator() -> None:
    """Run a region's or the root's aggregator as an MQTT service."""


@aggregator.command("regional", epilog=examples("fedge aggregator regional --config eu-aggregator.toml",
                                                "fedge aggregator regional --config eu-aggregator.toml --max-seconds 600 -v"))
@_CONFIG
@_MAX_SECONDS
def regional(config_path: Path, max_seconds: float | None) -> None:
    """Serve one region: device updates in, receipts and the region's model out, aggregates to the root."""
    try:
        settings = load_regional_service_config(config_path)
        layout = TopicLayout(fleet=settings.aggregator.fleet)
        with RegionalAggregator.open(settings.store, settings.aggregator, member=settings.member) as agg:
            service = RegionalService(agg, region=settings.aggregator.region, layout=layout,
                                      broker=settings.broker, loop=settings.loop)
            with _stop_on_signals() as stop:
                _report(service.run(stop, max_seconds))
    except (ConfigError, FedgeError) as exc:
        raise click.ClickException(str(exc)) from exc


@aggregator.command("root", epilog=examples("fedge aggregator root --config root-aggregator.toml"))
@_CONFIG
@_MAX_SECONDS
def root(config_path: Path, max_seconds: float | None) -> None:
    """Serve the root: regions' aggregates in, the signed global model out (round 0 from the bundle)."""
    try:
        settings = load_root_service_config(config_path)
        layout = TopicLayout(fleet=settings.aggregator.fleet)
        with RootAggregator.open(settings.store, settings.aggregator, member=settings.member) as agg:
            initial = initial_shared_params(settings) if agg.current_model() is None else None
            service = RootService(agg, layout=layout, broker=settings.broker, loop=settings.loop, initial_params=initial)
            with _stop_on_signals() as stop:
                _report(service.run(stop, max_seconds))
    except (ConfigError, FedgeError) as exc:
        raise click.ClickException(str(exc)) from exc


def initial_shared_params(settings: RootServiceConfig) -> dict[str, np.ndarray]:
    """The bundle's initial shared weights (round 0's global model), read through ONNX Runtime from its checkpoint."""
    fleet_key = load_verify_key(settings.fleet_public_key)
    with tempfile.TemporaryDirectory(prefix="fedge-root-bundle-") as scratch:
        bundle = install_bundle(settings.bundle, fleet_key, Path(scratch) / "bundle")
        return DeviceTrainer(bundle).get_shared()


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM (so the service disconnects and writes its counters); handlers restored after."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _report(report: ServiceReport) -> None:
    dropped = ", ".join(f"{name}={n}" for name, n in sorted(report.counters.items())) or "none"
    click.echo(f"stopped ({report.ended_by}) after {report.connects} connection(s); dropped by the service: {dropped}")
