"""A provisioned fleet on real Mosquitto with real services and agents, driven through the CLIs in subprocesses.

- The operator guide's five commands (read from docs/fleet.md) get rounds through.
- Status cannot be published by another device (generated ACLs) nor forged (signature); the monitor reads only.
- Day-2 commands apply to a running fleet by SIGHUP: an added device's round is accepted, a removed one is
  shut out by the broker and refused by the aggregator, without restarting anything.
- With TLS on, devices dial the TLS listener with the fleet CA and the monitor reads over TLS.
"""

from __future__ import annotations

import json
import queue
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.daemon.config import load_config
from device_agent.keys import load_recipient_key, load_signing_key
from device_agent.protocol.envelope import seal_update
from device_agent.protocol.headers import UpdateHeader
from device_agent.protocol.status import DeviceStatus, open_status, sign_status
from device_agent.protocol.topics import TopicLayout
from sdk.demo.brokers import broker_owner, free_port
from sdk.fleet.day2 import open_fleet
from sdk.fleet.provision import init_fleet
from sdk.fleet.spec import parse_fleet_spec
from sdk.fleet.up import FleetRunner
from tests.mosquitto_broker import reachable_dir, wait_for
from tests.sdk.fleet.conftest import loopback_topology

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]
GUIDE = Path(__file__).resolve().parents[3] / "docs" / "fleet.md"
BIN = Path(sys.executable).parent
LAYOUT = TopicLayout(fleet="lab")


def free_ports() -> dict[str, tuple[int, int]]:
    return {site: (free_port(), free_port()) for site in ("root", "eu", "us")}


def guide_commands() -> list[str]:
    text = GUIDE.read_text(encoding="utf-8")
    section = text[text.index("## Zero to a running fleet"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "docs/fleet.md has no bash block under 'Zero to a running fleet'"
    return [line for line in block.group(1).splitlines() if line.strip()]


def run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done


def tool(argv: list[str]) -> list[str]:
    """``fedge`` / ``fedge-agent`` of this environment."""
    return [str(BIN / argv[0]), *argv[1:]]


def write_local_data(device_dir: Path, digits, index: int, count: int = 200) -> None:
    x, y = digits
    data = device_dir / "var" / "data"
    data.mkdir(parents=True, exist_ok=True)
    np.savez(data / "local.npz", x=x[index * count:(index + 1) * count], y=y[index * count:(index + 1) * count])


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory Mosquitto (dropped to its own user when the tests run as root) can traverse."""
    path = reachable_dir("fedge-fleet-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Up:
    """``fedge fleet up`` in a subprocess, stopped (SIGTERM) at the end."""

    def __init__(self, fleet_dir: Path, cwd: Path, *extra: str, max_seconds: float = 600) -> None:
        self.log = cwd / "fleet-up.log"
        self._handle = self.log.open("w")
        self.proc = subprocess.Popen(tool(["fedge", "fleet", "up", str(fleet_dir), "--max-seconds", str(max_seconds), *extra]),
                                     cwd=cwd, stdout=self._handle, stderr=subprocess.STDOUT, text=True)
        self.fleet_dir = fleet_dir
        ready = wait_for(lambda: "running; Ctrl-C" in self.log.read_text() or self.proc.poll() is not None, timeout=90)
        assert ready and self.proc.poll() is None, f"fleet up did not start:\n{self.log.read_text()[-4000:]}"

    def service_log(self, site: str) -> str:
        return (self.fleet_dir / "run" / f"aggregator-{site}.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._handle.close()


def agents(fleet_dir: Path, devices: list[str], cwd: Path, rounds: int) -> dict[str, dict]:
    """``fedge-agent run --config ... --rounds N`` for each device at once; their JSON results."""
    procs = {d: subprocess.Popen(tool(["fedge-agent", "run", "--config", str(fleet_dir / "devices" / d / "agent.toml"),
                                       "--rounds", str(rounds)]), cwd=cwd, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for d in devices}
    results = {}
    for device, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        assert proc.returncode == 0, f"{device}: exit {proc.returncode}\n{err[-3000:]}"
        results[device] = json.loads(out.strip().splitlines()[-1])
    return results


def test_operator_guide_commands_get_rounds_through(workdir: Path, digits) -> None:
    (workdir / "topology.toml").write_text(loopback_topology(free_ports()))
    commands = guide_commands()
    assert len(commands) <= 5, "the guide promises at most five commands"
    up = None
    try:
        for line in commands:
            argv = shlex.split(line)
            if argv[:3] == ["fedge", "fleet", "up"]:
                for index, device in enumerate(sorted((workdir / "fleet" / "devices").iterdir())):
                    write_local_data(device, digits, index)  # what each device's sensor adapter would write
                up = Up(workdir / "fleet", workdir)
            elif argv[0] == "fedge-agent":
                template = argv
                devices = sorted(d.name for d in (workdir / "fleet" / "devices").iterdir())
                assert "fleet/devices/eu-dev-0001/agent.toml" in template
                results = agents(workdir / "fleet", devices, workdir, rounds=2)
            else:
                run(tool(argv), workdir)
        assert up is not None, "the guide never starts the fleet"
        for device, result in results.items():
            statuses = [r["status"] for r in result["rounds"]]
            assert result["finished"] == 2 and statuses.count("accepted") >= 1, (device, result)
        shown = json.loads(run(tool(["fedge", "fleet", "status", str(workdir / "fleet"), "--json"]), workdir).stdout)
        rows = {row["device"]: row for rows in shown["regions"].values() for row in rows}
        assert set(rows) == set(results)
        for device, row in rows.items():
            assert row["verdict"] == "verified", row
            assert row["bundle_version"] == 1 and row["last_round_status"] in ("accepted", "stale", "duplicate")
            assert row["loss_finite"] is True and row["online"] is False  # the agents have stopped cleanly
    finally:
        if up is not None:
            up.stop()


# -- status: ACLs and signatures on real Mosquitto -------------------------------------------------------


class Client:
    """A paho client of one fleet account; records what it receives."""

    def __init__(self, port: int, username: str, password: str, *, client_id: str | None = None) -> None:
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.connack: queue.Queue[object] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"{username}-test-{time.monotonic_ns()}")
        self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.put(rc)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload), bool(m.retain)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        rc = self.connack.get(timeout=10)
        assert not rc.is_failure, f"{username} refused: {rc}"

    def subscribe(self, topic: str) -> None:
        done: queue.Queue[int] = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, rcs, p: done.put(mid)
        self.client.subscribe(topic, qos=1)
        done.get(timeout=10)

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def drain(self, quiet: float = 1.0) -> list[tuple[str, bytes, bool]]:
        got = []
        while True:
            try:
                got.append(self.messages.get(timeout=quiet))
            except queue.Empty:
                return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _password(fleet_dir: Path, kind: str, name: str) -> str:
    return str(json.loads((fleet_dir / "brokers" / "credentials" / kind / f"{name}.json").read_text())["password"])


def _status(device: str, region: str, loss: float) -> DeviceStatus:
    return DeviceStatus(fleet="lab", region=region, device=device, sequence=0, timestamp_ms=int(time.time() * 1000),
                        online=True, agent_version="0.1.0", bundle_model="digits", bundle_version=1, last_loss=loss)


def test_status_cannot_be_published_by_another_device_nor_forged_and_the_monitor_only_reads(
        workdir: Path, fleet_key, bundle_factory) -> None:
    text = loopback_topology(free_ports())
    fleet_dir = workdir / "fleet"
    init_fleet(parse_fleet_spec(text), fleet_dir, topology_text=text, fleet_key=fleet_key, bundle=bundle_factory("fedavg"),
               owner=broker_owner())
    opened = open_fleet(fleet_dir)
    runner = FleetRunner(opened, sites=["root", "eu", "us"], services=False)
    runner.start()
    clients: list[Client] = []
    try:
        eu_port, root_port = opened.spec.topology.region("eu").address.port, opened.spec.topology.root.address.port
        key1 = load_signing_key(fleet_dir / "devices/eu-dev-0001/keys/device.key")
        key2 = load_signing_key(fleet_dir / "devices/eu-dev-0002/keys/device.key")
        dev1 = Client(eu_port, "eu-dev-0001", _password(fleet_dir, "devices", "eu-dev-0001"), client_id="eu-dev-0001")
        dev2 = Client(eu_port, "eu-dev-0002", _password(fleet_dir, "devices", "eu-dev-0002"), client_id="eu-dev-0002")
        monitor = Client(eu_port, "fedge-monitor", _password(fleet_dir, "monitors", "fedge-monitor"))
        agg = Client(eu_port, "eu-agg", _password(fleet_dir, "aggregators", "eu-agg"))
        root_monitor = Client(root_port, "fedge-monitor", _password(fleet_dir, "monitors", "fedge-monitor"))
        clients += [dev1, dev2, monitor, agg, root_monitor]
        agg.subscribe("fedge/lab/dev/#")
        agg.subscribe("fedge/lab/model/#")
        root_monitor.subscribe(LAYOUT.all_region_statuses)
        genuine = sign_status(_status("eu-dev-0001", "eu", 0.5), signer_key=key1)
        dev1.publish(LAYOUT.device_status("eu-dev-0001"), genuine)
        # Another device publishes on eu-dev-0001's status topic: the broker's ACL drops it.
        dev2.publish(LAYOUT.device_status("eu-dev-0001"), sign_status(_status("eu-dev-0001", "eu", 9.9), signer_key=key2))
        # The monitor publishes nothing anywhere, its own name's device topics included.
        for topic in (LAYOUT.device_status("eu-dev-0001"), LAYOUT.device_status("fedge-monitor"),
                      LAYOUT.device_update("fedge-monitor"), LAYOUT.global_model):
            monitor.publish(topic, b"monitor was here")
        seen = agg.drain()
        assert [(t, p) for t, p, _ in seen] == [(LAYOUT.device_status("eu-dev-0001"), genuine)]
        # The monitor reads statuses, retained, and never an update.
        monitor.subscribe(LAYOUT.all_device_statuses)
        monitor.subscribe(LAYOUT.all_device_updates)
        dev1.publish(LAYOUT.device_update("eu-dev-0001"), b"sealed bytes", retain=False)
        assert [(t, p, r) for t, p, r in monitor.drain()] == [(LAYOUT.device_status("eu-dev-0001"), genuine, True)]
        # The bridge carried it to the root, under its region.
        assert root_monitor.drain(quiet=2.0)[-1][:2] == (LAYOUT.region_device_status("eu", "eu-dev-0001"), genuine)
        # An account that may write there (the aggregator's) cannot forge it either: the signature gives it away.
        agg.publish(LAYOUT.device_status("eu-dev-0001"), sign_status(_status("eu-dev-0001", "eu", 0.1), signer_key=key2))
        wait_for(lambda: False, timeout=1.5)  # let the bridge carry it
        shown = json.loads(run(tool(["fedge", "fleet", "status", str(fleet_dir), "--json"]), workdir).stdout)
        row = next(r for r in shown["regions"]["eu"] if r["device"] == "eu-dev-0001")
        assert row["verdict"] == "forged or unknown key" and "last_loss" not in row
        by_region = json.loads(run(tool(["fedge", "fleet", "status", str(fleet_dir), "--from", "regions", "--json"]),
                                   workdir).stdout)
        assert next(r for r in by_region["regions"]["eu"] if r["device"] == "eu-dev-0001")["verdict"] == "forged or unknown key"
        assert {r["verdict"] for r in by_region["regions"]["us"]} == {"never reported"}
        assert open_status(genuine, device_keys={"eu-dev-0001": key1.public_key()}, fleet="lab").last_loss == 0.5
    finally:
        for client in clients:
            client.close()
        runner.stop()


# -- day 2 on a running fleet --------------------------------------------------------------------------------


def test_day2_on_a_running_fleet_applies_without_restarts(workdir: Path, digits, fleet_key, bundle_factory) -> None:
    text = loopback_topology(free_ports()).replace("deadline_s = 30", "deadline_s = 4")
    fleet_dir = workdir / "fleet"
    init_fleet(parse_fleet_spec(text), fleet_dir, topology_text=text, fleet_key=fleet_key, bundle=bundle_factory("fedavg"),
               owner=broker_owner())
    removed_key = load_signing_key(fleet_dir / "devices/us-dev-0002/keys/device.key")
    removed_password = _password(fleet_dir, "devices", "us-dev-0002")
    up = Up(fleet_dir, workdir)
    try:
        topology = open_fleet(fleet_dir).spec.topology
        us_port = topology.region("us").address.port
        run(tool(["fedge", "fleet", "add", str(fleet_dir), "eu-dev-0003", "--region", "eu"]), workdir)
        out = run(tool(["fedge", "fleet", "remove", str(fleet_dir), "us-dev-0002", "--json"]), workdir).stdout
        change = json.loads(out)
        assert change["reloads"]["broker us"].startswith("reloaded") and change["reloads"]["aggregator us"].startswith("reloaded")
        assert wait_for(lambda: "registry" in up.service_log("eu") and "eu-dev-0003" in up.service_log("eu"), timeout=10)
        # The added device plays rounds without any restart: its update is accepted.
        write_local_data(fleet_dir / "devices" / "eu-dev-0003", digits, 0)
        result = agents(fleet_dir, ["eu-dev-0003"], workdir, rounds=2)["eu-dev-0003"]
        assert "accepted" in [r["status"] for r in result["rounds"]], result
        # The removed device's broker account is gone ...
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="us-dev-0002")
        client.username_pw_set("us-dev-0002", removed_password)
        answers: queue.Queue[object] = queue.Queue()
        client.on_connect = lambda c, u, f, rc, p: answers.put(rc)
        client.connect("127.0.0.1", us_port)
        client.loop_start()
        try:
            assert answers.get(timeout=10).is_failure
        finally:
            client.loop_stop()
        # ... and an update signed with its key, even on its own topic, is refused by the aggregator and logged by name.
        agg = Client(us_port, "us-agg", _password(fleet_dir, "aggregators", "us-agg"))
        header = UpdateHeader.create(fleet="lab", region="us", sender="us-dev-0002", round=0, bundle_version=1, sample_count=1)
        recipient = load_recipient_key(fleet_dir / "devices/us-dev-0001/keys/aggregator.x25519.pub")
        blob = seal_update(header, {"x": np.zeros(1, np.float32)}, recipient_public_key=recipient, sender_key=removed_key)
        agg.publish(LAYOUT.device_update("us-dev-0002"), blob, retain=False)
        agg.close()
        assert wait_for(lambda: "claiming to be from 'us-dev-0002'" in up.service_log("us"), timeout=10), up.service_log("us")[-3000:]
        assert "is not in the registry" in up.service_log("us")
    finally:
        up.stop()


def test_tls_fleet_devices_dial_tls_and_the_monitor_reads_over_tls(workdir: Path, digits, fleet_key, bundle_factory) -> None:
    text = loopback_topology(free_ports(), tls=True).replace("deadline_s = 30", "deadline_s = 6")
    fleet_dir = workdir / "fleet"
    made = init_fleet(parse_fleet_spec(text), fleet_dir, topology_text=text, fleet_key=fleet_key,
                      bundle=bundle_factory("fedavg"), owner=broker_owner())
    for index, device in enumerate(sorted(made.devices.values())):
        write_local_data(device, digits, index)
    up = Up(fleet_dir, workdir)
    try:
        results = agents(fleet_dir, ["eu-dev-0001", "us-dev-0001"], workdir, rounds=1)
        assert all(r["finished"] == 1 for r in results.values()), results
        shown = json.loads(run(tool(["fedge", "fleet", "status", str(fleet_dir), "--json"]), workdir).stdout)
        rows = {row["device"]: row for rows in shown["regions"].values() for row in rows}
        assert rows["eu-dev-0001"]["verdict"] == rows["us-dev-0001"]["verdict"] == "verified"
        assert rows["eu-dev-0002"]["verdict"] == "never reported"
        config = load_config(fleet_dir / "devices/eu-dev-0001/agent.toml")
        assert config.broker.port == made.spec.topology.region("eu").address.tls_port and config.broker.tls is not None
    finally:
        up.stop()
