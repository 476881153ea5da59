"""``fedge-agent run`` says what it does at its default level (INFO), as text or JSON Lines, before or after the subcommand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.device_agent.daemon.fleet_harness import write_config

pytestmark = pytest.mark.mosquitto


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "device_agent.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("where", ["before", "after"])
def test_agent_run_logs_json_lines_at_its_default_level(fleet, where):
    config = write_config(fleet.config_path, fleet.sections)
    peek = fleet.agent()  # installs the bundle; only used to read its initial weights
    weights = peek.trainer.global_reference
    peek.close()
    fleet.responder.publish_model(0, weights)
    run = ["run", "--config", str(config), "--rounds", "1"]
    proc = _run(["--log-format", "json", *run] if where == "before" else [*run, "--log-format", "json"])

    assert proc.returncode == 0, proc.stderr
    entries = [json.loads(line) for line in proc.stderr.splitlines()]  # every line is one JSON object
    assert entries and all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    messages = [e["message"] for e in entries]
    assert any(m.startswith("device eu-dev-0001: bundle") for m in messages), messages  # start
    assert any(m.startswith("MQTT connected to 127.0.0.1") for m in messages), messages
    assert any(m.startswith("round 0: trained") for m in messages), messages
    assert any(m.startswith("round 0: sent update") for m in messages), messages
    assert {e["level"] for e in entries} <= {"INFO", "WARNING"}
    assert json.loads(proc.stdout)["rounds"][0]["status"] == "accepted"


def test_agent_quiet_run_and_text_format(fleet):
    config = write_config(fleet.config_path, fleet.sections)
    peek = fleet.agent()
    weights = peek.trainer.global_reference
    peek.close()
    fleet.responder.publish_model(0, weights)

    quiet = _run(["-q", "run", "--config", str(config), "--rounds", "1"])
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr  # -q: warnings and worse only

    fleet.responder.publish_model(1, weights)
    text = _run(["run", "--config", str(config), "--rounds", "1", "--log-format", "text"])
    assert text.returncode == 0, text.stderr
    assert " INFO device_agent.daemon.connection: MQTT connected to 127.0.0.1" in text.stderr
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.stderr.splitlines()[0])


def test_agent_rejects_an_unknown_log_format():
    proc = _run(["--log-format", "xml", "run", "--config", "x.toml"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--log-format" in proc.stderr
