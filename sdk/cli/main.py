"""``fedge``: host-side command line. Subcommands are grouped by what they act on (conventions: docs/cli.md)."""

from __future__ import annotations

import click

from device_agent import __version__
from sdk.broker_config.cli import broker_config
from sdk.cli.aggregator_cmd import aggregator
from sdk.cli.bench_cmd import bench
from sdk.cli.bundle_cmd import bundle
from sdk.cli.dashboard_cmd import dashboard
from sdk.cli.demo_cmd import demo
from sdk.cli.family import FedgeGroup, add_verbosity_everywhere, configure_logging, examples, verbosity_options
from sdk.cli.fleet_cmd import fleet
from sdk.cli.keys_cmd import keys
from sdk.cli.release_cmd import release
from sdk.cli.simulate_cmd import simulate


@click.group(cls=FedgeGroup, params=verbosity_options(),
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
             epilog=examples("fedge keys generate --out fleet.key",
                             "fedge bundle build --model sdk.models:PersonalizedMLP --model-arg in_features=64 "
                             "--input-shape 64 --mode fedavg --shared '*' --key fleet.key --name digits -o digits.fedge",
                             "fedge demo --devices 8 --rounds 2",
                             "fedge simulate --dataset digits --algorithm fedalt -v",
                             "",
                             "Exit codes: 0 ok, 1 failure (refused or failed), 2 usage or input error (docs/cli.md)."))
@click.version_option(__version__, "--version", prog_name="fedge", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """fedge: on-device federated learning for edge and IoT fleets.

    Typical flow: `fedge keys generate` makes a fleet signing key, `fedge bundle
    build` turns a PyTorch model into a signed ONNX Runtime training bundle,
    devices run it with `fedge-agent`, and `fedge demo` shows the whole loop.
    """
    configure_logging(ctx)  # -v/-q/--log-format after the subcommand adjust it again when they are parsed


cli.add_command(keys)
cli.add_command(bundle)
cli.add_command(demo)
cli.add_command(bench)
cli.add_command(simulate)
cli.add_command(aggregator)
cli.add_command(dashboard)
cli.add_command(broker_config, name="broker-config")
cli.add_command(fleet)
cli.add_command(release)
add_verbosity_everywhere(cli)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fedge")
