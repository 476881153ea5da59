"""``fedge dashboard --fleet DIR``: the configuration read from a directory of ``fedge fleet init``."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.daemon.errors import ConfigError
from sdk.dashboard.fleet_dir import config_from_fleet
from sdk.fleet.provision import init_fleet
from sdk.fleet.spec import parse_fleet_spec
from tests.sdk.fleet.conftest import loopback_topology


def test_config_from_a_fleet_directory(tmp_path: Path, fleet_key, bundle_factory) -> None:
    text = loopback_topology()
    fleet = init_fleet(parse_fleet_spec(text), tmp_path / "fleet", topology_text=text, fleet_key=fleet_key,
                       bundle=bundle_factory("fedavg"))
    root_toml = fleet.directory / "aggregators" / "root" / "root.toml"
    root_toml.write_text(root_toml.read_text() + '\n[metrics]\nport = 9100\nbind = "0.0.0.0"\n')
    eu_toml = fleet.directory / "aggregators" / "eu" / "regional.toml"
    eu_toml.write_text(eu_toml.read_text() + "\n[metrics]\nport = 0\n")  # any free port: not discoverable, skipped

    config = config_from_fleet(fleet.directory, metrics=["http://127.0.0.1:9102/metrics"])
    assert config.fleet == "lab" and config.topic_prefix == "fedge"
    assert config.mqtt is not None and (config.mqtt.host, config.mqtt.port, config.mqtt.role) == ("127.0.0.1", 21883, "root")
    assert config.mqtt.username == "fedge-monitor" and config.mqtt.password
    assert set(config.registries) == {"eu", "us"}
    assert set(config.registries["eu"]) == {"eu-dev-0001", "eu-dev-0002"} and len(config.registries["us"]) == 2
    assert set(config.model_keys) == {"root"}
    assert config.release_root == fleet.directory / "release" / "root.json"  # the rollout's stage is verified from it
    assert config.metrics == ("http://127.0.0.1:9100/metrics", "http://127.0.0.1:9102/metrics")
    assert config.server.bind == "127.0.0.1"


def test_config_from_a_directory_that_is_no_fleet(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a fleet directory"):
        config_from_fleet(tmp_path)
