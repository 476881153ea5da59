"""Release topics through the brokers ``fedge fleet init`` generates (real Mosquitto, generated ACLs and bridges).

- The release account publishes the repository at the root; the bridges carry
  it down and each regional broker keeps it retained for devices that come later.
- A device reads release topics but cannot write them (its publish is dropped:
  the retained original stays), nor can it at the root.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdk.aggregator.service_config import BrokerSettings
from sdk.demo.brokers import broker_owner, free_port
from sdk.fleet.day2 import open_fleet
from sdk.fleet.provision import init_fleet
from sdk.fleet.spec import parse_fleet_spec
from sdk.fleet.status_fetch import BrokerEndpoint, fetch_retained
from sdk.fleet.up import FleetRunner
from sdk.release.fleet_ops import open_release_fleet
from sdk.release.publisher import MqttSession, PublishError, publish_repository
from tests.mosquitto_broker import reachable_dir
from tests.sdk.fleet.conftest import loopback_topology

pytestmark = pytest.mark.mosquitto


@pytest.fixture
def live_fleet() -> Iterator[tuple[Path, dict[str, tuple[int, int]]]]:
    """A provisioned fleet (no bundle) with its three brokers running."""
    work = reachable_dir("fedge-release-brokers-")
    ports = {site: (free_port(), free_port()) for site in ("root", "eu", "us")}
    text = loopback_topology(ports)
    made = init_fleet(parse_fleet_spec(text), work / "fleet", topology_text=text, owner=broker_owner())
    runner = FleetRunner(open_fleet(made.directory), sites=["root", "eu", "us"])
    try:
        for site in runner.sites:
            runner._start_broker(site)
        yield made.directory, ports
    finally:
        runner.stop()
        shutil.rmtree(work, ignore_errors=True)


def _account(fleet_dir: Path, kind: str, name: str, port: int) -> BrokerEndpoint:
    doc = json.loads((fleet_dir / "brokers" / "credentials" / kind / f"{name}.json").read_text())
    return BrokerEndpoint(name=name, host="127.0.0.1", port=port, username=name, password=doc["password"])


def _retained(endpoint: BrokerEndpoint) -> dict[str, bytes]:
    return dict(fetch_retained(endpoint, "fedge/lab/release/#", quiet_s=0.8))


def test_releases_reach_every_region_retained_and_devices_cannot_write_them(live_fleet) -> None:
    fleet_dir, ports = live_fleet
    opened = open_release_fleet(fleet_dir)
    publish_repository(opened.repository(), opened.broker("release-tool"), opened.fleet.spec.topology.layout)
    expected = {f"fedge/lab/release/metadata/{name}" for name in opened.repository().published_files()}
    deadline = time.monotonic() + 10
    device = _account(fleet_dir, "devices", "eu-dev-0001", ports["eu"][0])
    while set(_retained(device)) != expected:  # the bridge carries them down, the region keeps them retained
        assert time.monotonic() < deadline, "release metadata did not reach the eu broker"
    us_device = next(p.name for p in (fleet_dir / "devices").iterdir() if p.name.startswith("us-"))
    assert set(_retained(_account(fleet_dir, "devices", us_device, ports["us"][0]))) == expected
    original = _retained(device)["fedge/lab/release/metadata/timestamp.json"]
    for port in (ports["eu"][0], ports["root"][0]):
        settings = BrokerSettings(host="127.0.0.1", port=port, client_id=f"eu-dev-0001-{port}", username="eu-dev-0001",
                                  password=device.password)
        try:
            with MqttSession(settings, timeout_s=5) as session:
                session.publish_all([("fedge/lab/release/metadata/timestamp.json", b"forged")])
        except PublishError:
            assert port == ports["root"][0], "the region accepts the device's login (and drops the publish)"
    time.sleep(0.5)
    assert _retained(device)["fedge/lab/release/metadata/timestamp.json"] == original
    root_view = _retained(_account(fleet_dir, "releases", "fedge-release", ports["root"][0]))
    assert root_view["fedge/lab/release/metadata/timestamp.json"] == original
