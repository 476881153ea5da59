"""``fedge broker-config``: generate a fleet's broker files, or refresh the committed examples.

The ``fedge`` CLI mounts :data:`broker_config` as a subcommand; ``python -m
sdk.broker_config`` runs it on its own.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import click

from sdk.broker_config.render import render_example_files
from sdk.broker_config.topology import Topology, TopologyError, load_topology
from sdk.broker_config.writer import generate_topology

_TOPOLOGY = click.option(
    "--topology", "topology_path", required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path), help="The fleet's topology.toml.",
)


_EXAMPLES_GENERATE = ("Examples:\n\n\b\n  fedge broker-config generate --topology broker_config/topology.toml --out /tmp/fleet-brokers\n"
                      "  fedge broker-config generate --topology topology.toml --out out/ --deploy-dir /etc/mosquitto/fedge "
                      "--owner mosquitto")


def _load(path: Path) -> Topology:
    try:
        return load_topology(path)
    except TopologyError as exc:
        raise click.ClickException(f"{path}: {exc}") from exc


@click.group("broker-config")
def broker_config() -> None:
    """Mosquitto configs, ACLs, passwords and TLS material for a fleet's brokers."""


@broker_config.command(epilog=_EXAMPLES_GENERATE)
@_TOPOLOGY
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New or empty directory to write into.")
@click.option("--deploy-dir", default=None,
              help="Directory each broker's files will occupy on its host (default: where they are written).")
@click.option("--owner", default=None,
              help="Give the files Mosquitto opens after dropping privileges to this user (e.g. mosquitto).")
def generate(topology_path: Path, out: Path, deploy_dir: str | None, owner: str | None) -> None:
    """Write every broker's directory, fresh credentials and (with TLS) a new CA into OUT."""
    topology = _load(topology_path)
    try:
        generated = generate_topology(
            topology, out, deploy_dir=PurePosixPath(deploy_dir) if deploy_dir else None, owner=owner
        )
    except (FileExistsError, LookupError) as exc:
        raise click.BadParameter(str(exc), param_hint="--out" if isinstance(exc, FileExistsError) else "--owner") from exc
    except OSError as exc:  # an unwritable --out (a path under a file, a read-only directory, ...)
        raise click.BadParameter(f"{out}: cannot write: {exc.strerror or exc}", param_hint="--out") from exc
    for broker in generated.brokers:
        click.echo(f"{broker.name:>12}  {broker.directory}")
    click.echo(f"{'credentials':>12}  {generated.credentials_dir}  ({len(generated.credential_files)} accounts)")
    if generated.ca_key_file is not None:
        click.echo(f"{'CA key':>12}  {generated.ca_key_file}  (keep it offline)")


@broker_config.command("render-examples", epilog="Examples:\n\n\b\n  fedge broker-config render-examples --topology broker_config/topology.toml --out broker_config")
@_TOPOLOGY
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to (over)write the secret-free example files in.")
def render_examples(topology_path: Path, out: Path) -> None:
    """Write the secret-free configs and ACLs (placeholders for secrets), as committed in broker_config/."""
    for file in render_example_files(_load(topology_path)):
        path = out / file.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(file.text, encoding="utf-8")
        click.echo(str(path))
