"""``fedge demo``: a whole federation on this machine (root + two bridged regions over real Mosquitto).

The logic is in :mod:`sdk.demo`; this command only parses options, prints
progress and the final table, and maps failures to a clean exit.
"""

from __future__ import annotations

import signal

import click

from sdk.cli.family import examples
from sdk.demo.settings import BROKER_BACKENDS, MAX_DEVICES
from sdk.training_defaults import DEFAULT_LEARNING_RATE


@click.command(epilog=examples("fedge demo", "fedge demo --devices 8 --rounds 2",
                               "fedge demo --broker embedded --devices 4 --rounds 2   # no Mosquitto needed",
                               "fedge demo --keep-workdir -v"))
@click.option("--devices", type=click.IntRange(2, MAX_DEVICES), default=MAX_DEVICES, show_default=True,
              help="Smartwatch clients to run as devices, split between the left-arm and right-arm regions.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="Federated rounds.")
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Local epochs per FedAlt phase per round.")
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_LEARNING_RATE,
              show_default=True)
@click.option("--mu", type=click.FloatRange(min=0), default=0.01, show_default=True, help="FedProx weight on the shared layers.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=900.0, show_default=True,
              help="Give up after this many seconds of federated training.")
@click.option("--broker", type=click.Choice(BROKER_BACKENDS), default="auto", show_default=True,
              help="auto: Mosquitto if installed (or installable as root), else embedded amqtt brokers in this "
                   "process (dev mode: no ACLs).")
@click.option("--keep-workdir", is_flag=True, help="Keep keys, bundle, broker files, stores and device state.")
def demo(devices: int, rounds: int, epochs: int, learning_rate: float, mu: float, seed: int, timeout_s: float,
         broker: str, keep_workdir: bool) -> None:
    """Run a federation end to end: signed FedAlt bundle, root + 2 regional brokers, aggregators, device agents."""
    from sdk.demo import DemoError, DemoSettings, format_result, run_demo
    from sdk.demo.report import format_round

    settings = DemoSettings(devices=devices, rounds=rounds, epochs=epochs, learning_rate=learning_rate, mu=mu,
                            seed=seed, timeout_s=timeout_s, broker=broker)
    click.echo(f"fedge demo: {devices} devices in 2 regions (left arm / right arm), {rounds} rounds, FedAlt (mu={mu:g}); "
               "building the bundle and the fleet...")
    # SIGTERM tears down like Ctrl-C: the brokers run in their own sessions and would outlive a plain kill.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = run_demo(settings, keep_workdir=keep_workdir, on_round=lambda line: click.echo(format_round(line)))
    except DemoError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        raise click.Abort() from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo("")
    click.echo(format_result(result))
    if result.workdir is not None:
        click.echo(f"work directory kept: {result.workdir}")
