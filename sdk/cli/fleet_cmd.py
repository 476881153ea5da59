"""``fedge fleet``: provision a fleet from its topology, run one host's share, change one device, see every device.

The operator guide (docs/fleet.md) walks through them in order.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import click

from device_agent.keys import load_signing_key
from sdk.broker_config.topology import TopologyError
from sdk.cli.family import InputError, examples, load_key
from sdk.fleet.day2 import FleetChange
from sdk.fleet.spec import FleetSpec, load_fleet_spec

_FLEET_DIR = click.argument("fleet_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))


@click.group()
def fleet() -> None:
    """Provision and operate a fleet: brokers, aggregators and devices from one topology file."""


@fleet.command("init", epilog=examples(
    "fedge fleet init topology.toml --out fleet/",
    "fedge fleet init topology.toml --out fleet/ --fleet-key fleet.key --bundle model.fedge",
    "fedge fleet init topology.toml --out fleet/ --deploy-dir /etc/mosquitto/fedge --owner mosquitto"))
@click.argument("topology", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New or empty directory for the fleet (keys, brokers/, aggregators/, devices/).")
@click.option("--fleet-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The bundle signing key to use (copied to OUT/keys/fleet.key); default: a new one.")
@click.option("--bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The fleet's first bundle, signed with the fleet key (default: add it later with `fedge fleet bundle`).")
@click.option("--deploy-dir", default=None,
              help="Directory each broker's files will occupy on its host (default: where they are written).")
@click.option("--owner", default="auto", show_default=True,
              help="User Mosquitto drops to, given the files it opens; 'auto': mosquitto when run as root, 'none': leave ownership.")
def init(topology: Path, out: Path, fleet_key: Path | None, bundle: Path | None, deploy_dir: str | None, owner: str) -> None:
    """Write a whole fleet from TOPOLOGY into OUT: keys, broker configs, aggregator configs, one directory per device."""
    from sdk.demo.brokers import broker_owner
    from sdk.fleet.provision import init_fleet
    from sdk.fleet.tiers import describe_sites

    spec = _spec(topology)
    key = load_key("--fleet-key", fleet_key, load_signing_key) if fleet_key is not None else None
    chosen = broker_owner() if owner == "auto" else None if owner == "none" else owner
    try:
        made = init_fleet(spec, out, topology_text=topology.read_text(encoding="utf-8"), fleet_key=key, bundle=bundle,
                          deploy_dir=PurePosixPath(deploy_dir) if deploy_dir else None, owner=chosen)
    except FileExistsError as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from exc
    except LookupError as exc:
        raise click.BadParameter(str(exc), param_hint="--owner") from exc
    click.echo(f"fleet {spec.topology.fleet} in {made.directory}")
    click.echo(f"  brokers      {made.directory / 'brokers'}  ({describe_sites(spec.topology)})")
    click.echo(f"  aggregators  {', '.join(str(p) for p in made.aggregators.values())}")
    click.echo(f"  devices      {len(made.devices)} provisioning directories under {made.directory / 'devices'}")
    click.echo(f"  bundle       {made.bundle if made.bundle else 'none yet: fedge fleet bundle ' + str(made.directory) + ' BUNDLE'}")


@fleet.command("bundle", epilog=examples("fedge fleet bundle fleet/ model.fedge"))
@_FLEET_DIR
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def bundle_cmd(fleet_dir: Path, bundle: Path) -> None:
    """Make BUNDLE (signed with the fleet key) the fleet's: copied into every aggregator and device directory.

    For the first bundle of a fleet made without --bundle; later versions travel over MQTT (rollout).
    """
    from sdk.fleet.day2 import open_fleet
    from sdk.fleet.provision import check_aggregator_configs, install_bundle_copies

    opened = open_fleet(fleet_dir)
    own = install_bundle_copies(opened.directory, bundle, sites=opened.sites(), devices=opened.device_dirs())
    check_aggregator_configs(opened.directory, opened.spec)
    click.echo(f"{own}: copied to {len(opened.sites())} aggregator and {len(opened.device_dirs())} device directories")


@fleet.command("up", epilog=examples("fedge fleet up fleet/                       # every site on this host",
                                     "fedge fleet up fleet/ --site eu             # the eu broker and service only",
                                     "fedge fleet up fleet/ --no-brokers          # services only (Mosquitto runs under systemd)"))
@_FLEET_DIR
@click.option("--site", "sites", multiple=True, help="root or a region (or middle tier) name; repeat it (default: every site).")
@click.option("--brokers/--no-brokers", default=True, show_default=True,
              help="Start Mosquitto for each site (off: the brokers already run, e.g. under systemd).")
@click.option("--services/--no-services", default=True, show_default=True,
              help="Start the aggregator service of each site (off: brokers only).")
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this long (default: until SIGINT/SIGTERM).")
def up(fleet_dir: Path, sites: tuple[str, ...], brokers: bool, services: bool, max_seconds: float | None) -> None:
    """Run this host's share of the fleet in the foreground: brokers (parents first), then services (children first)."""
    import signal
    import threading

    from sdk.fleet.day2 import open_fleet
    from sdk.fleet.up import FleetRunner, FleetUpError

    opened = open_fleet(fleet_dir)
    chosen = sites or ("root", *(r.name for r in opened.spec.topology.regions))
    try:
        runner = FleetRunner(opened, sites=chosen, brokers=brokers, services=services)
    except FleetUpError as exc:
        raise click.BadParameter(str(exc), param_hint="--site") from exc
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        runner.start()
        for child in runner.children:
            click.echo(f"{child.name:<18} pid {child.process.pid:<7} log {child.log}")
        click.echo("running; Ctrl-C stops everything", err=True)
        runner.watch(stop, max_seconds)
    except FleetUpError as exc:  # a broker or service would not start or died: a failure, exit 1
        raise click.ClickException(str(exc)) from exc
    finally:
        runner.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)


_RELOAD = click.option("--reload/--no-reload", default=True, show_default=True,
                       help="Send SIGHUP to the brokers and services `fedge fleet up` runs on this host, so they apply it now.")
_JSON = click.option("--json", "as_json", is_flag=True, help="Print the change as JSON.")


def _report_change(fleet_dir: Path, change: FleetChange, reload: bool, as_json: bool) -> None:
    import json

    from sdk.fleet.day2 import describe, signal_reloads

    outcome = signal_reloads(fleet_dir, change) if reload else {}
    if as_json:
        click.echo(json.dumps({**describe(change), "reloads": outcome}))
        return
    where = change.device_dir if change.device_dir is not None else "(directory removed)"
    click.echo(f"{change.action} {change.device}: {where}")
    if change.revoked_key:
        click.echo(f"  revoked key {change.revoked_key}")
    for name in [f"broker {b}" for b in change.brokers] + [f"aggregator {a}" for a in change.aggregators]:
        click.echo(f"  {name}: {outcome.get(name, 'send it SIGHUP (kill -HUP PID) to apply the change')}")
    for note in change.notes:
        click.echo(f"  next: {note}")


@fleet.command("add", epilog=examples("fedge fleet add fleet/ eu-dev-0042 --region eu"))
@_FLEET_DIR
@click.argument("device")
@click.option("--region", required=True, help="The region the device joins.")
@_RELOAD
@_JSON
def add(fleet_dir: Path, device: str, region: str, reload: bool, as_json: bool) -> None:
    """Provision DEVICE in REGION: key, broker account, registry entry, provisioning directory (no other device changes)."""
    from sdk.fleet.day2 import add_device, open_fleet

    _report_change(fleet_dir, add_device(open_fleet(fleet_dir), device, region), reload, as_json)


@fleet.command("remove", epilog=examples("fedge fleet remove fleet/ eu-dev-0042"))
@_FLEET_DIR
@click.argument("device")
@_RELOAD
@_JSON
def remove(fleet_dir: Path, device: str, reload: bool, as_json: bool) -> None:
    """Take DEVICE out: broker account, registry entry and directory removed, its key revoked fleet-wide."""
    from sdk.fleet.day2 import open_fleet, remove_device

    _report_change(fleet_dir, remove_device(open_fleet(fleet_dir), device), reload, as_json)


@fleet.command("rekey", epilog=examples("fedge fleet rekey fleet/ eu-dev-0042"))
@_FLEET_DIR
@click.argument("device")
@_RELOAD
@_JSON
def rekey(fleet_dir: Path, device: str, reload: bool, as_json: bool) -> None:
    """Give DEVICE a new identity key and broker password (the old key is revoked); install its new directory on it."""
    from sdk.fleet.day2 import open_fleet, rekey_device

    _report_change(fleet_dir, rekey_device(open_fleet(fleet_dir), device), reload, as_json)


@fleet.command("move", epilog=examples("fedge fleet move fleet/ eu-dev-0042 --to us"))
@_FLEET_DIR
@click.argument("device")
@click.option("--to", "to_region", required=True, help="The region the device moves to.")
@_RELOAD
@_JSON
def move(fleet_dir: Path, device: str, to_region: str, reload: bool, as_json: bool) -> None:
    """Move DEVICE to another region: it leaves the old region's broker and registry in the same operation."""
    from sdk.fleet.day2 import move_device, open_fleet

    _report_change(fleet_dir, move_device(open_fleet(fleet_dir), device, to_region), reload, as_json)


@fleet.command("status", epilog=examples("fedge fleet status fleet/", "fedge fleet status fleet/ --from regions --json"))
@_FLEET_DIR
@click.option("--from", "source", type=click.Choice(["root", "regions"]), default="root", show_default=True,
              help="Read the statuses bridged to the root broker, or from each regional broker.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds to wait for each broker.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the tables.")
def status(fleet_dir: Path, source: str, timeout: float, as_json: bool) -> None:
    """Every device's signed status, verified against the registries, as a table per region."""
    import json

    from sdk.fleet.day2 import open_fleet
    from sdk.fleet.status_fetch import fetch_statuses, monitor_endpoints
    from sdk.fleet.status_view import build_view, render_table

    opened = open_fleet(fleet_dir)
    topology = opened.spec.topology
    if topology.monitor is None:
        raise InputError("this fleet has no monitoring account ([monitor] enabled = false in its topology)")
    registries = opened.registries()  # the regions devices join (a middle tier has none)
    endpoints = {site: e for site, e in monitor_endpoints(opened.directory, topology.monitor).items()
                 if site == "root" or site in registries}
    messages = fetch_statuses(endpoints, source=source, topics=topology.layout, timeout_s=timeout)
    view = build_view(layout=topology.layout, regions=list(registries), registries=registries,
                      expected={d: e.region for d, e in opened.inventory.devices.items()}, messages=messages)
    if as_json:
        click.echo(json.dumps(view.to_json(), indent=2))
    else:
        click.echo(render_table(view), nl=False)


def _spec(path: Path) -> FleetSpec:
    try:
        return load_fleet_spec(path)
    except TopologyError as exc:
        raise InputError(str(exc)) from exc

