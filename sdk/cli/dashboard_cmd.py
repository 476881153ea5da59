"""``fedge dashboard``: serve the live fleet page (docs/operations.md, "The dashboard")."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import replace
from pathlib import Path

from typing import TYPE_CHECKING

import click

from device_agent.daemon.errors import ConfigError
from device_agent.errors import FedgeError
from sdk.cli.family import InputError, examples, service_logging
from sdk.dashboard.config import DashboardConfig, load_dashboard_config
from sdk.dashboard.fleet_dir import config_from_fleet
from sdk.dashboard.security import ExposureError, check_exposure

if TYPE_CHECKING:  # aiohttp and matplotlib load only when a dashboard is served (50 MB in every aggregator otherwise)
    from sdk.dashboard.server import Dashboard

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command("dashboard", epilog=examples(
    "fedge dashboard --fleet FLEET                                 # a directory of fedge fleet init",
    "fedge dashboard --fleet FLEET --metrics http://127.0.0.1:9101/metrics",
    "fedge dashboard --config dashboard.toml                       # http://127.0.0.1:8765/",
    "fedge dashboard --config dashboard.toml --port 9000",
    "fedge dashboard --config dashboard.toml --bind 0.0.0.0 --auth-file dashboard.auth --tls-cert d.crt --tls-key d.key"))
@click.option("--config", "config_path", type=_FILE, default=None,
              help="The dashboard's TOML file: fleet, registries, monitoring account, metrics URLs (docs/operations.md).")
@click.option("--fleet", "fleet_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Or a fleet directory (fedge fleet init): its monitoring account, registries and [metrics] endpoints.")
@click.option("--metrics", "metrics_urls", multiple=True, help="An aggregator's /metrics URL to add (repeatable).")
@click.option("--bind", default=None, help="Address to listen on (default: the file's, else 127.0.0.1). "
                                           "Off loopback it needs --auth-file and TLS.")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port (default: the file's, else 8765; 0: any free).")
@click.option("--auth-file", type=_FILE, default=None, help="HTTP Basic credentials, one line user:password (chmod 600).")
@click.option("--tls-cert", type=_FILE, default=None, help="Serve HTTPS with this certificate (PEM) ...")
@click.option("--tls-key", type=_FILE, default=None, help="... and this key (PEM).")
@click.option("--plain-http", is_flag=True, default=False,
              help="Allow plain HTTP off loopback (only behind a TLS-terminating proxy).")
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this long (default: until SIGINT/SIGTERM).")
@click.pass_context
def dashboard(ctx: click.Context, config_path: Path | None, fleet_dir: Path | None, metrics_urls: tuple[str, ...],
              bind: str | None, port: int | None, auth_file: Path | None,
              tls_cert: Path | None, tls_key: Path | None, plain_http: bool, max_seconds: float | None) -> None:
    """Serve a live page of the fleet: devices, versions, rounds, accuracy, rollout (read-only)."""
    service_logging(ctx)
    if (config_path is None) == (fleet_dir is None):
        raise click.UsageError("give --config FILE or --fleet DIR (one of them)")
    try:
        if config_path is not None:
            config = load_dashboard_config(config_path)
            if metrics_urls:
                config = replace(config, metrics=config.metrics + tuple(u for u in metrics_urls if u not in config.metrics))
        elif fleet_dir is not None:
            config = config_from_fleet(fleet_dir, metrics=metrics_urls)
        changes = {k: v for k, v in dict(bind=bind, port=port, auth_file=auth_file, tls_cert_file=tls_cert,
                                         tls_key_file=tls_key).items() if v is not None}
        if plain_http:
            changes["plain_http"] = True
        config = config.with_server(**changes)
        credentials = check_exposure(config.server)
    except ExposureError as exc:
        raise InputError(str(exc)) from exc
    except (ConfigError, FedgeError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    from sdk.dashboard.server import Dashboard

    asyncio.run(_serve(config, Dashboard(config, credentials=credentials), max_seconds))


async def _serve(config: DashboardConfig, board: Dashboard, max_seconds: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            url = await board.start()
        except OSError as exc:
            raise InputError(f"cannot listen on {config.server.bind}:{config.server.port}: {exc.strerror or exc}") from exc
        click.echo(f"fedge dashboard of fleet {config.fleet}: {url}", err=True)
        try:
            await asyncio.wait_for(stop.wait(), timeout=max_seconds)
        except asyncio.TimeoutError:
            pass
    finally:
        await board.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
