"""``fedge dashboard``: serve the live fleet page (docs/operations.md, "The dashboard")."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from device_agent.daemon.errors import ConfigError
from device_agent.errors import FedgeError
from sdk.cli.family import InputError, examples, service_logging
from sdk.dashboard.config import DashboardConfig, load_dashboard_config
from sdk.dashboard.security import ExposureError, check_exposure
from sdk.dashboard.server import Dashboard

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command("dashboard", epilog=examples(
    "fedge dashboard --config dashboard.toml                       # http://127.0.0.1:8765/",
    "fedge dashboard --config dashboard.toml --port 9000",
    "fedge dashboard --config dashboard.toml --bind 0.0.0.0 --auth-file dashboard.auth --tls-cert d.crt --tls-key d.key"))
@click.option("--config", "config_path", type=_FILE, required=True,
              help="The dashboard's TOML file: fleet, device keys, monitoring account, metrics URLs (docs/operations.md).")
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
def dashboard(ctx: click.Context, config_path: Path, bind: str | None, port: int | None, auth_file: Path | None,
              tls_cert: Path | None, tls_key: Path | None, plain_http: bool, max_seconds: float | None) -> None:
    """Serve a live page of the fleet: devices, versions, rounds, accuracy, rollout (read-only)."""
    service_logging(ctx)
    try:
        config = load_dashboard_config(config_path)
        changes = {k: v for k, v in dict(bind=bind, port=port, auth_file=auth_file, tls_cert_file=tls_cert,
                                         tls_key_file=tls_key).items() if v is not None}
        if plain_http:
            changes["plain_http"] = True
        config = config.with_server(**changes)
        credentials = check_exposure(config.server)
    except ExposureError as exc:
        raise InputError(str(exc)) from exc
    except (ConfigError, FedgeError) as exc:
        raise InputError(str(exc)) from exc
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
