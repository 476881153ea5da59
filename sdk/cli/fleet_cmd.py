"""``fedge fleet``: provision a fleet from its topology, run one host's share, change one device, see every device.

The operator guide (docs/fleet.md) walks through them in order.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import click

from device_agent.keys import load_signing_key
from sdk.broker_config.topology import TopologyError
from sdk.cli.family import InputError, examples, load_key
from sdk.fleet.spec import load_fleet_spec

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
    click.echo(f"  brokers      {made.directory / 'brokers'}  (root + {len(spec.topology.regions)} regions)")
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


def _spec(path: Path):  # type: ignore[no-untyped-def]
    try:
        return load_fleet_spec(path)
    except TopologyError as exc:
        raise InputError(str(exc)) from exc

