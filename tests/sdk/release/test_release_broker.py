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


def test_rotating_the_targets_key_reaches_a_device_provisioned_with_root_v1(live_fleet, tmp_path: Path) -> None:
    """`fedge release rotate` (real CLI, real broker): a device trusting only root v1 follows root v2 over MQTT."""
    from click.testing import CliRunner

    from device_agent.release.tuf_view import BrokerFetcher, ReleaseRefusal, refresh_view
    from sdk.cli.main import cli

    fleet_dir, ports = live_fleet
    opened = open_release_fleet(fleet_dir)
    old_targets = {p.name: p.read_bytes() for p in (fleet_dir / "keys" / "release").glob("targets-*.pub")}
    result = CliRunner().invoke(cli, ["release", "rotate", str(fleet_dir), "targets"])
    assert result.exit_code == 0, result.output
    assert "root is now v2" in result.output
    assert {p.name for p in (fleet_dir / "keys" / "release" / "retired").glob("targets-*")} >= set(old_targets)
    device = _account(fleet_dir, "devices", "eu-dev-0001", ports["eu"][0])
    prefix = "fedge/lab/release/metadata/"
    # every file of the rotated repository, not only the new root: the bridge may carry them down in any order
    expected = opened.repository().published_files()
    assert "2.root.json" in expected
    deadline = time.monotonic() + 10
    while True:
        files = {t[len(prefix):]: p for t, p in _retained(device).items() if p}
        missing = sorted(name for name, data in expected.items() if files.get(name) != data)
        if not missing:
            break
        assert time.monotonic() < deadline, missing
    view = refresh_view(tmp_path / "device", bootstrap_root=(fleet_dir / "release" / "root.json").read_bytes(),
                        fetcher=BrokerFetcher(metadata=files.get, target=lambda sha: None))
    assert view.releases == () and view.timestamp_version >= 2
    # a device that never saw root v2 (withheld by the broker) cannot trust what the new targets key signed
    forged = dict(files)
    forged.pop("2.root.json")
    try:
        refresh_view(tmp_path / "fresh-device", bootstrap_root=(fleet_dir / "release" / "root.json").read_bytes(),
                     fetcher=BrokerFetcher(metadata=forged.get, target=lambda sha: None))
    except ReleaseRefusal as exc:  # without root v2 the new targets signature cannot verify
        assert exc.reason in ("untrusted_metadata", "metadata_rollback"), exc
    else:
        raise AssertionError("targets signed by the new key verified without the new root")
    assert opened.repository().root.md.signed.version == 2
