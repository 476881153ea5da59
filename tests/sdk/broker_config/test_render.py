"""Rendered ACLs, mosquitto.conf and bridge files say what the fleet needs and nothing more."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path, PurePosixPath

import pytest

from sdk.broker_config.acl import render_region_acl, render_root_acl
from sdk.broker_config.layout import BrokerPaths
from sdk.broker_config.mosquitto import render_bridge_conf, render_region_conf, render_root_conf
from sdk.broker_config.render import render_config_files, render_credentials, render_password_files
from sdk.broker_config.topology import TlsSettings, Topology, load_topology

SMALL = Path(__file__).parent / "data" / "small_topology.toml"
PATHS = BrokerPaths(base=PurePosixPath("/srv/b"))
_PATH_KEYS = re.compile(r"^(password_file|acl_file|persistence_location|include_dir|cafile|certfile|keyfile|"
                        r"bridge_cafile|bridge_certfile|bridge_keyfile) (\S+)$", re.MULTILINE)


@pytest.fixture
def topology() -> Topology:
    return load_topology(SMALL)


def _tls(topology: Topology, **changes: bool) -> Topology:
    return dataclasses.replace(topology, tls=dataclasses.replace(topology.tls, **changes))


def _rules(acl: str) -> list[str]:
    return [line for line in acl.splitlines() if line and not line.startswith("#")]


def test_render_region_acl_confines_devices_with_patterns_and_nothing_for_anonymous(topology: Topology) -> None:
    rules = _rules(render_region_acl(topology, topology.region("eu")))
    first_user = next(i for i, line in enumerate(rules) if line.startswith("user "))
    assert not [line for line in rules[:first_user] if line.startswith("topic ")]  # anonymous gets nothing
    assert rules[:first_user] == [
        "pattern write fedge/f/dev/%u/up/#",
        "pattern write fedge/f/dev/%u/status",
        "pattern write fedge/f/dev/%u/presence",
        "pattern read fedge/f/dev/%u/down/#",
        "pattern read fedge/f/model/#",
        "pattern read fedge/f/release/#",
    ]
    assert rules[first_user:] == ["user eu-agg", "topic readwrite fedge/f/#",
                                  "user fedge-monitor", "topic deny fedge/f/dev/fedge-monitor/#",
                                  "topic read fedge/f/dev/+/status", "topic read fedge/f/dev/+/presence",
                                  "topic read fedge/f/model/#", "topic read fedge/f/release/metadata/#"]
    assert "eu-dev-0001" not in render_region_acl(topology, topology.region("eu"))  # devices need no user block


def test_render_root_acl_gives_each_bridge_only_its_region(topology: Topology) -> None:
    rules = _rules(render_root_acl(topology))
    assert rules[:7] == [
        "user bridge-eu",
        "topic write fedge/f/region/eu/up/#",
        "topic write fedge/f/region/eu/dev/+/status",
        "topic write fedge/f/region/eu/bridge/state",
        "topic read fedge/f/root/model/#",
        "topic read fedge/f/region/eu/down/#",
        "topic read fedge/f/release/#",
    ]
    assert rules[7] == "user bridge-us" and "topic write fedge/f/region/us/up/#" in rules
    assert "topic read fedge/f/region/us/down/#" in rules and "topic read fedge/f/region/eu/down/#" not in rules[7:]
    assert rules[-10:] == ["user root-agg", "topic readwrite fedge/f/#",
                          "user fedge-release", "topic readwrite fedge/f/release/#",
                          "topic read fedge/f/region/+/dev/+/status",
                          "user fedge-monitor",
                          "topic read fedge/f/region/+/dev/+/status", "topic read fedge/f/root/model/#",
                          "topic read fedge/f/region/+/bridge/state", "topic read fedge/f/release/metadata/#"]
    assert not [line for line in rules if line.startswith("pattern")]


def test_render_region_conf_with_tls(topology: Topology) -> None:
    conf = render_region_conf(topology, topology.region("eu"), paths=PATHS)
    lines = conf.splitlines()
    for line in ("per_listener_settings false", "allow_anonymous false", "message_size_limit 1000",
                 f"max_packet_size {1000 + 65536}", "listener 1883 127.0.0.1", "listener 8883 127.0.0.2",
                 "persistence true", "include_dir /srv/b/conf.d", "log_dest stderr",
                 "max_inflight_messages 100", "max_queued_messages 10000", f"max_queued_bytes {64 * 1024 * 1024}"):
        assert line in lines
    assert "require_certificate true" not in lines
    assert all(path.startswith("/srv/b/") for _, path in _PATH_KEYS.findall(conf))
    mtls = render_region_conf(_tls(topology, require_client_certs=True), topology.region("eu"), paths=PATHS)
    assert "require_certificate true" in mtls.splitlines()


def test_render_root_conf_without_tls_has_one_listener_and_no_bridge(topology: Topology) -> None:
    plain = dataclasses.replace(topology, tls=TlsSettings())
    conf = render_root_conf(plain, paths=PATHS)
    assert [line for line in conf.splitlines() if line.startswith("listener")] == ["listener 1883"]
    assert "cafile" not in conf and "include_dir" not in conf and "connection " not in conf


def test_render_bridge_conf_maps_uplink_out_and_model_in(topology: Topology) -> None:
    conf = render_bridge_conf(topology, topology.region("eu"), paths=PATHS, password="s3cret")
    lines = conf.splitlines()
    for line in ("address root.example:8883", "remote_username bridge-eu", "remote_password s3cret",
                 "cleansession false", "topic # out 1 fedge/f/region/eu/up/ fedge/f/region/eu/up/",
                 "topic # in 1 fedge/f/root/model/ fedge/f/root/model/",
                 "topic # in 1 fedge/f/region/eu/down/ fedge/f/region/eu/down/",
                 "topic # in 1 fedge/f/release/ fedge/f/release/",
                 "notification_topic fedge/f/region/eu/bridge/state", "bridge_cafile /srv/b/tls/ca.crt"):
        assert line in lines
    assert "bridge_certfile" not in conf
    mtls = render_bridge_conf(_tls(topology, require_client_certs=True), topology.region("eu"), paths=PATHS,
                              password="p")
    assert "bridge_keyfile /srv/b/tls/bridge.key" in mtls.splitlines()
    plain = render_bridge_conf(dataclasses.replace(topology, tls=TlsSettings()), topology.region("eu"),
                               paths=PATHS, password="p")
    assert "address root.example:1883" in plain.splitlines() and "bridge_cafile" not in plain
    with pytest.raises(ValueError):
        render_bridge_conf(topology, topology.region("eu"), paths=PATHS, password="two words")


def test_render_config_files_marks_only_bridge_files_secret(topology: Topology) -> None:
    files = render_config_files(topology, bases={"root": PurePosixPath("/r"), "eu": PurePosixPath("/e"),
                                                  "us": PurePosixPath("/u")},
                                bridge_passwords={"eu": "pe", "us": "pu"})
    assert {str(f.path): f.secret for f in files} == {
        "root/mosquitto.conf": False, "root/acl": False,
        "eu/mosquitto.conf": False, "eu/acl": False, "eu/conf.d/bridge-root.conf": True,
        "us/mosquitto.conf": False, "us/acl": False, "us/conf.d/bridge-root.conf": True,
    }


def test_render_password_files_put_each_account_on_its_own_broker(topology: Topology) -> None:
    hashes = {a.username: f"$7$1$s${a.username}" for a in topology.accounts()}
    files = {str(f.path): f.text for f in render_password_files(topology, hashes)}
    assert [line.split(":")[0] for line in files["root/passwords"].splitlines()] == [
        "bridge-eu", "bridge-us", "fedge-monitor", "fedge-release", "root-agg"]
    assert [line.split(":")[0] for line in files["eu/passwords"].splitlines()] == [
        "eu-agg", "eu-dev-0001", "eu-dev-0002", "fedge-monitor"]
    assert files["us/passwords"] == "fedge-monitor:$7$1$s$fedge-monitor\nus-1:$7$1$s$us-1\nus-agg:$7$1$s$us-agg\n"


def test_render_credentials_dial_the_tls_port_and_skip_bridges(topology: Topology) -> None:
    import json

    files = {str(f.path): json.loads(f.text) for f in render_credentials(topology, {
        a.username: f"pw-{a.username}" for a in topology.accounts()})}
    assert set(files) == {"credentials/aggregators/root-agg.json", "credentials/aggregators/eu-agg.json",
                          "credentials/aggregators/us-agg.json", "credentials/devices/eu-dev-0001.json",
                          "credentials/devices/eu-dev-0002.json", "credentials/devices/us-1.json",
                          "credentials/monitors/fedge-monitor.json", "credentials/releases/fedge-release.json"}
    d1 = files["credentials/devices/eu-dev-0001.json"]
    assert (d1["username"], d1["password"], d1["host"], d1["port"], d1["ca_file"], d1["region"]) == (
        "eu-dev-0001", "pw-eu-dev-0001", "eu.example", 8883, "ca.crt", "eu")
    assert d1["message_size_limit"] == 1000 and d1["client_cert_file"] is None
    assert files["credentials/aggregators/root-agg.json"]["region"] is None
