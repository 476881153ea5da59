"""``fedge demo --broker embedded``: the same federation over amqtt brokers and paho bridges inside the process.

No Mosquitto needed (hence no ``mosquitto`` mark); skipped when amqtt is not installed.
"""

from __future__ import annotations

import threading

import pytest
from click.testing import CliRunner

from sdk.cli.main import cli
from sdk.demo import DemoSettings, format_result, run_demo

pytest.importorskip("amqtt")

CHANCE = 1 / 7


def _demo_threads() -> set[str]:
    """Names of live threads the demo starts: broker event loops, aggregator services, devices, paho network loops."""
    return {t.name for t in threading.enumerate() if t.name.startswith(("fedge-", "paho-"))}


def test_demo_embedded_four_devices_two_rounds_all_accepted_above_chance_and_torn_down() -> None:
    before = _demo_threads()
    result = run_demo(DemoSettings(devices=4, rounds=2, timeout_s=50.0, broker="embedded"))

    assert result.broker == "embedded"
    assert [(r.round, r.region) for r in result.rounds] == [(0, "left"), (0, "right"), (1, "left"), (1, "right")]
    for line in result.rounds:
        assert len(line.statuses) == 2 and set(line.statuses.values()) == {"accepted"}, line
    assert result.all_accepted
    assert result.final_round == 2 and result.global_shift > 0
    assert [r.devices for r in result.regions] == [2, 2]
    assert result.overall.personal_accuracy > CHANCE
    assert all(r.personal_accuracy > CHANCE for r in result.regions)
    assert "ACLs NOT enforced" in format_result(result)
    # Teardown: every broker loop, bridge and service thread has been joined (devices are joined by run_demo).
    assert _demo_threads() - before == set()


def test_demo_settings_refuse_unknown_broker_backend() -> None:
    with pytest.raises(ValueError, match="broker"):
        DemoSettings(broker="rabbitmq")


def test_demo_cli_offers_the_broker_choice() -> None:
    outcome = CliRunner().invoke(cli, ["demo", "--broker", "nats"])
    assert outcome.exit_code == 2 and "--broker" in outcome.output


def test_demo_auto_backend_is_embedded_without_mosquitto_and_apt(monkeypatch: pytest.MonkeyPatch) -> None:
    import sdk.demo.run as run

    monkeypatch.setattr(run, "find_mosquitto", lambda: None)
    monkeypatch.setattr(run.shutil, "which", lambda _name: None)
    assert run.choose_backend("auto") == "embedded"
    assert run.choose_backend("embedded") == "embedded"


def test_demo_embedded_cli_output_has_no_traceback() -> None:
    """amqtt 0.12.1 raced a connect against a subscribe ("dictionary changed size during iteration") and printed
    3-7 asyncio tracebacks per run; the embedded broker now iterates a snapshot and contains anything else."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", "from sdk.cli.main import main; main()", "demo", "--broker", "embedded",
                          "--devices", "4", "--rounds", "2", "--timeout", "120"],
                         capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "Traceback" not in output and "dictionary changed size" not in output, output
    assert "contained" not in output, output
    assert "Invalid connection" not in output, output  # the agents' MQTT 5 probe is not noise at WARNING
    assert "updates accepted: all (8/8)" in output, output
