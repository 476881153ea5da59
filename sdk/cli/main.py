"""``fedge``: host-side command line. Subcommands are grouped by what they act on."""

from __future__ import annotations

import logging

import click

from sdk.broker_config.cli import broker_config
from sdk.cli.aggregator_cmd import aggregator
from sdk.cli.bench_cmd import bench
from sdk.cli.bundle_cmd import bundle
from sdk.cli.demo_cmd import demo
from sdk.cli.keys_cmd import keys
from sdk.cli.simulate_cmd import simulate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """fedge: on-device federated learning for edge and IoT fleets.

    Typical flow: `fedge keys generate` makes a fleet signing key, `fedge bundle
    build` turns a PyTorch model into a signed ONNX Runtime training bundle,
    devices run it with `fedge-agent`, and `fedge demo` shows the whole loop.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


cli.add_command(keys)
cli.add_command(bundle)
cli.add_command(demo)
cli.add_command(bench)
cli.add_command(simulate)
cli.add_command(aggregator)
cli.add_command(broker_config, name="broker-config")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fedge")
