"""The annotated agent.toml shipped inside the package (``fedge-agent config example``) is a valid config."""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

from device_agent.daemon.config import load_config
from tests.device_agent.daemon.fleet_harness import FleetKeys


def test_packaged_config_example_parses(tmp_path: Path, fleet_keys: FleetKeys):
    home = tmp_path / "example"
    keys = home / "keys"
    keys.mkdir(parents=True)
    (home / "agent.toml").write_text(files("device_agent").joinpath("agent.example.toml").read_text(encoding="utf-8"))
    for name, source in {"fleet.pub": "fleet.pub", "eu-dev-0001.key": "device.key", "eu-agg.x25519.pub": "aggregator.pub",
                         "root.pub": "root.pub", "eu.pub": "region.pub"}.items():
        shutil.copy(fleet_keys.directory / source, keys / name)
    (keys / "mqtt-password").write_text("pw\n")
    (keys / "ca.pem").write_text("ca\n")
    config = load_config(home / "agent.toml")
    assert (config.device_id, config.region) == ("eu-dev-0001", "eu")
    assert config.broker.read_password() == "pw"
