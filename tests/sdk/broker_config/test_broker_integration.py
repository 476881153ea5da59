"""A generated 2-region fleet on three real Mosquitto brokers, exercised with paho-mqtt clients.

The brokers' files live in a ``mosquitto.workspace()`` directory instead of
``tmp_path``: Mosquitto drops to user ``mosquitto`` before opening them, and
pytest's temp directories are 0700 root. Denied publishes are acknowledged
and dropped, so "nothing arrives" is shown with a marker: the same client
publishes a permitted message right after the forbidden one, and per-client
ordering means the forbidden one would have arrived first.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from sdk.broker_config import GeneratedTopology, generate_topology, parse_topology
from sdk.broker_config.acl import bridge_state_topic
from sdk.broker_config.passwords import hash_password, new_password, render_password_file
from sdk.broker_config.pki import create_ca
from tests.mosquitto_broker import (
    MOSQUITTO_USER,
    MosquittoBroker,
    MosquittoFactory,
    free_port,
    mosquitto_fixture,
    wait_for,
)

pytestmark = pytest.mark.mosquitto

mosquitto_module = mosquitto_fixture(scope="module", name="mosquitto_module")
mosquitto = mosquitto_fixture()

WAIT = 5.0
"""Upper bound of every wait for something that should arrive."""
QUIET = 0.5
"""How long a marker may trail a message that must not arrive (it is normally milliseconds)."""


def topology_toml(ports: dict[str, tuple[int, int]], *, mtls: bool = False) -> str:
    """Two regions of two devices each, every broker on loopback at the given (port, tls_port)."""

    def broker(name: str) -> str:
        port, tls_port = ports[name]
        return f'host = "127.0.0.1"\nbind = "127.0.0.1"\nport = {port}\ntls_port = {tls_port}\n'

    return f"""
[fleet]
name = "itest"
message_size_limit = 65536
[tls]
enabled = true
require_client_certs = {str(mtls).lower()}
[root]
{broker("root")}aggregators = ["root-agg"]
[[regions]]
name = "eu"
{broker("eu")}aggregators = ["eu-agg"]
device_count = 2
[[regions]]
name = "us"
{broker("us")}aggregators = ["us-agg"]
devices = ["us-dev-0001", "us-dev-0002"]
"""


@dataclass
class Fleet:
    generated: GeneratedTopology
    brokers: dict[str, MosquittoBroker]

    def credentials(self, username: str) -> dict[str, Any]:
        return json.loads(self.generated.credential_files[username].read_text())

    def client(self, username: str, *, password: str | None = None, tls: bool = False,
               session: str | None = None) -> Probe:
        """A connected client of ``username`` on its own broker (plain loopback port unless ``tls``)."""
        cred = self.credentials(username)
        broker = self.brokers[cred["broker"]]
        ca = str(self.generated.credentials_dir / cred["ca_file"]) if tls else None
        return Probe.connect(username, password or cred["password"],
                             port=broker.ports[1] if tls else broker.ports[0], ca_file=ca, session=session)


class Probe:
    """A paho 2.x client whose callbacks only enqueue; tests read the queues with bounded waits."""

    def __init__(self, username: str, password: str, *, ca_file: str | None = None,
                 cert: tuple[str, str] | None = None, session: str | None = None) -> None:
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.connack: queue.Queue[mqtt.ReasonCode] = queue.Queue()
        self.subacks: queue.Queue[int] = queue.Queue()
        # ``session`` names a persistent session (clean_session false) that outlives the connection.
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=session or f"probe-{username}-{id(self)}",
                                  clean_session=session is None, reconnect_on_failure=False)
        self.client.username_pw_set(username, password)
        if ca_file:
            self.client.tls_set(ca_certs=ca_file, certfile=cert[0] if cert else None,
                                keyfile=cert[1] if cert else None)
        self.client.on_connect = lambda c, u, flags, rc, props: self.connack.put(rc)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload), m.retain))
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(mid)
        # A TLS 1.3 server rejects a missing client certificate after the handshake: no CONNACK comes.
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.connack.put(
            mqtt.ReasonCode(mqtt.PacketTypes.CONNACK, "Unspecified error"))

    @classmethod
    def connect(cls, username: str, password: str, *, port: int, ca_file: str | None = None,
                cert: tuple[str, str] | None = None, session: str | None = None) -> Probe:
        probe = cls(username, password, ca_file=ca_file, cert=cert, session=session)
        if not probe.start(port):
            probe.close()
            raise ConnectionRefusedError(username)
        return probe

    def start(self, port: int) -> bool:
        """Connect; True once the broker accepts, False when it refuses or the TLS handshake fails."""
        try:
            self.client.connect("127.0.0.1", port, keepalive=30)
        except (ssl.SSLError, OSError):
            return False
        self.client.loop_start()
        try:
            return not self.connack.get(timeout=WAIT).is_failure
        except queue.Empty:
            return False

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        assert self.subacks.get(timeout=WAIT) == mid

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def receive(self, timeout: float = WAIT) -> tuple[str, bytes, bool]:
        return self.messages.get(timeout=timeout)

    def receive_until(self, payload: bytes, timeout: float = WAIT) -> list[tuple[str, bytes]]:
        """Every message that is not a stored retained one, up to and including the first with ``payload``."""
        seen = []
        while True:
            topic, body, retained = self.receive(timeout)
            if not retained:
                seen.append((topic, body))
            if body == payload:
                return seen

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_fleet(factory: MosquittoFactory, *, mtls: bool = False, regions: tuple[str, ...] = ("eu", "us"),
                root: bool = True) -> Fleet:
    ports = {name: (free_port(), free_port()) for name in ("root", "eu", "us")}
    topology = parse_topology(topology_toml(ports, mtls=mtls))
    owner = MOSQUITTO_USER if os.geteuid() == 0 else None  # the user a root-started Mosquitto drops to
    generated = generate_topology(topology, factory.workspace() / "fleet", owner=owner)
    wanted = (("root",) if root else ()) + regions
    brokers = {name: factory.start(config_file=generated.broker(name).config_file) for name in wanted}
    return Fleet(generated=generated, brokers=brokers)


@pytest.fixture(scope="module")
def fleet(mosquitto_module: MosquittoFactory) -> Fleet:
    return start_fleet(mosquitto_module)


@pytest.fixture
def clients() -> Iterator[list[Probe]]:
    """Collects Probes made in a test and closes them after it."""
    made: list[Probe] = []
    yield made
    for probe in made:
        probe.close()


def wait_bridges_up(fleet: Fleet, probes: list[Probe]) -> None:
    """Block until the root has seen every running region's bridge connect (its retained state is 1)."""
    root = fleet.client("root-agg")
    probes.append(root)
    regions = [n for n in fleet.brokers if n != "root"]
    for region in regions:
        root.subscribe(bridge_state_topic(fleet.generated.topology, region))
    states: dict[str, bytes] = {}
    while len(states) < len(regions) or set(states.values()) != {b"1"}:
        topic, payload, _ = root.receive()
        states[topic] = payload


def test_device_update_reaches_regional_aggregator_via_shared_subscription(fleet: Fleet, clients: list[Probe]) -> None:
    layout = fleet.generated.topology.layout
    aggregator = fleet.client("eu-agg")
    device = fleet.client("eu-dev-0001")
    clients += [aggregator, device]
    aggregator.subscribe(layout.shared("eu-aggregators", layout.all_device_updates))

    device.publish(layout.device_update("eu-dev-0001"), b"sealed-update")

    assert aggregator.receive()[:2] == (layout.device_update("eu-dev-0001"), b"sealed-update")


def test_regional_aggregate_is_bridged_out_to_the_root(fleet: Fleet, clients: list[Probe]) -> None:
    layout = fleet.generated.topology.layout
    wait_bridges_up(fleet, clients)
    root = fleet.client("root-agg")
    clients.append(root)
    root.subscribe(layout.all_region_aggregates)

    for region in ("eu", "us"):
        regional = fleet.client(f"{region}-agg")
        clients.append(regional)
        regional.publish(layout.region_aggregate(region), f"aggregate-{region}".encode())
        assert root.receive()[:2] == (layout.region_aggregate(region), f"aggregate-{region}".encode())


def test_root_model_is_bridged_in_to_every_region(fleet: Fleet, clients: list[Probe]) -> None:
    layout = fleet.generated.topology.layout
    wait_bridges_up(fleet, clients)
    regionals = [fleet.client("eu-agg"), fleet.client("us-agg")]
    clients += regionals
    for regional in regionals:
        regional.subscribe(layout.root_model)
    root = fleet.client("root-agg")
    clients.append(root)

    root.publish(layout.root_model, b"global-model-r1")

    for regional in regionals:
        assert regional.receive_until(b"global-model-r1")[-1] == (layout.root_model, b"global-model-r1")


def test_device_cannot_publish_on_another_devices_topic_or_the_model(fleet: Fleet, clients: list[Probe]) -> None:
    layout = fleet.generated.topology.layout
    aggregator = fleet.client("eu-agg")
    attacker = fleet.client("eu-dev-0001")
    clients += [aggregator, attacker]
    aggregator.subscribe(f"{layout.base}/#")

    attacker.publish(layout.device_update("eu-dev-0002"), b"forged-update")
    attacker.publish(layout.global_model, b"forged-model")
    attacker.publish(layout.region_aggregate("eu"), b"forged-aggregate")
    attacker.publish(layout.device_update("eu-dev-0001"), b"marker")

    assert [body for _, body in aggregator.receive_until(b"marker")] == [b"marker"]
    with pytest.raises(queue.Empty):
        aggregator.receive(timeout=QUIET)  # nor does anything trail it


def test_device_reads_only_its_own_downlink_and_the_model(fleet: Fleet, clients: list[Probe]) -> None:
    layout = fleet.generated.topology.layout
    aggregator = fleet.client("eu-agg")
    snoop = fleet.client("eu-dev-0002")
    clients += [aggregator, snoop]
    snoop.subscribe(layout.device_receipt("eu-dev-0001"))
    snoop.subscribe(layout.device_receipt("eu-dev-0002"))
    snoop.subscribe(layout.global_model)

    aggregator.publish(layout.device_receipt("eu-dev-0001"), b"receipt-for-0001")
    aggregator.publish(layout.global_model, b"regional-model", retain=True)
    aggregator.publish(layout.device_receipt("eu-dev-0002"), b"receipt-for-0002")

    bodies = [body for _, body in snoop.receive_until(b"receipt-for-0002")]
    assert bodies == [b"regional-model", b"receipt-for-0002"]


def test_wrong_password_and_wrong_region_are_refused(fleet: Fleet) -> None:
    with pytest.raises(ConnectionRefusedError):
        fleet.client("eu-dev-0001", password="not-the-password")
    us_device = fleet.credentials("us-dev-0001")
    with pytest.raises(ConnectionRefusedError):  # a device exists only on its own region's broker
        Probe.connect("us-dev-0001", us_device["password"], port=fleet.brokers["eu"].port)
    with pytest.raises(ConnectionRefusedError):
        Probe.connect("", "", port=fleet.brokers["eu"].port)


def test_tls_listener_accepts_clients_that_trust_the_generated_ca(
    fleet: Fleet, clients: list[Probe], tmp_path: Path
) -> None:
    layout = fleet.generated.topology.layout
    aggregator = fleet.client("eu-agg", tls=True)
    device = fleet.client("eu-dev-0002", tls=True)
    clients += [aggregator, device]
    aggregator.subscribe(layout.all_device_updates)
    device.publish(layout.device_update("eu-dev-0002"), b"over-tls")
    assert aggregator.receive()[:2] == (layout.device_update("eu-dev-0002"), b"over-tls")

    stranger_ca = tmp_path / "other-ca.crt"
    stranger_ca.write_bytes(create_ca("someone else", now=dt.datetime.now(dt.timezone.utc)).cert_pem)
    stranger = Probe("eu-dev-0002", fleet.credentials("eu-dev-0002")["password"], ca_file=str(stranger_ca))
    assert not stranger.start(fleet.brokers["eu"].ports[1])  # only the fleet CA vouches for the broker
    stranger.close()


def test_password_rotation_takes_effect_on_sighup(fleet: Fleet, clients: list[Probe]) -> None:
    broker = fleet.generated.broker("us")
    old = fleet.credentials("us-dev-0002")["password"]
    new = new_password()
    lines = dict(line.split(":", 1) for line in broker.password_file.read_text().splitlines())
    lines["us-dev-0002"] = hash_password(new)
    broker.password_file.write_text(render_password_file(lines))

    fleet.brokers["us"].reload()

    def refused(password: str) -> bool:
        probe = Probe("us-dev-0002", password)
        accepted = probe.start(fleet.brokers["us"].port)
        probe.close()
        return not accepted

    assert wait_for(lambda: refused(old), timeout=WAIT)
    assert not refused(new)


def test_model_published_while_a_region_is_down_reaches_its_aggregator(fleet: Fleet, clients: list[Probe]) -> None:
    """Persistent sessions end to end: root -> (bridge session at the root) -> restarted eu -> aggregator."""
    layout = fleet.generated.topology.layout
    wait_bridges_up(fleet, clients)
    regional = fleet.client("eu-agg", session="eu-agg-persistent")
    regional.subscribe(layout.root_model)
    regional.close()
    root = fleet.client("root-agg")
    clients.append(root)
    fleet.brokers["eu"].stop()  # SIGTERM: eu saves the aggregator's session to its persistence directory

    root.publish(layout.root_model, b"published-while-eu-was-down")
    fleet.brokers["eu"].start()  # same ports, same persistence directory

    regional = fleet.client("eu-agg", session="eu-agg-persistent")
    clients.append(regional)
    assert regional.receive_until(b"published-while-eu-was-down")[-1][0] == layout.root_model


def test_payloads_over_the_size_limit_are_dropped(fleet: Fleet, clients: list[Probe]) -> None:
    layout = fleet.generated.topology.layout
    limit = fleet.generated.topology.message_size_limit
    aggregator = fleet.client("us-agg")
    device = fleet.client("us-dev-0001")
    clients += [aggregator, device]
    aggregator.subscribe(layout.all_device_updates)

    device.publish(layout.device_update("us-dev-0001"), b"x" * (limit + 1))
    device.publish(layout.device_update("us-dev-0001"), b"y" * limit)

    assert [len(body) for _, body in aggregator.receive_until(b"y" * limit)] == [limit]


def test_mtls_listener_requires_a_client_certificate(mosquitto: MosquittoFactory, clients: list[Probe]) -> None:
    fleet = start_fleet(mosquitto, mtls=True, regions=("eu",), root=False)
    cred = fleet.credentials("eu-dev-0001")
    creds_dir = fleet.generated.credentials_dir
    tls_port = fleet.brokers["eu"].ports[1]
    ca = str(creds_dir / cred["ca_file"])

    without = Probe("eu-dev-0001", cred["password"], ca_file=ca)
    assert not without.start(tls_port)
    without.close()
    with_cert = Probe.connect("eu-dev-0001", cred["password"], port=tls_port, ca_file=ca,
                              cert=(str(creds_dir / cred["client_cert_file"]),
                                    str(creds_dir / cred["client_key_file"])))
    clients.append(with_cert)
    with_cert.subscribe(fleet.generated.topology.layout.global_model)


def test_shared_group_splits_updates_even_with_an_offline_persistent_member(fleet: Fleet, clients: list[Probe]) -> None:
    """Mosquitto 2.0 quirk behind docs/broker.md's advice: aggregators in a share group use clean sessions.

    A member that left with a persistent session still gets its turn: its share
    is queued for it instead of going to the members that are connected.
    """
    layout = fleet.generated.topology.layout
    group = layout.shared("us-aggregators", layout.all_device_updates)
    live = fleet.client("us-agg")
    gone = fleet.client("us-agg", session="us-agg-persistent-member")
    device = fleet.client("us-dev-0001")
    clients += [live, device]
    live.subscribe(group)
    gone.subscribe(group)
    gone.close()

    for i in range(10):
        device.publish(layout.device_update("us-dev-0001"), f"u{i}".encode())
    device.publish(layout.device_update("us-dev-0001"), b"marker")

    received: list[bytes] = []
    while len(received) < 6:  # wait for the live member's half (and the marker, which may go either way)
        try:
            received.append(live.receive(timeout=QUIET)[1])
        except queue.Empty:
            break
    assert 5 <= len(received) <= 6  # not 11: the offline member's turns were queued for it
    returning = fleet.client("us-agg", session="us-agg-persistent-member")
    clients.append(returning)
    queued = [returning.receive()[1] for _ in range(11 - len(received))]
    assert sorted(received + queued) == sorted([f"u{i}".encode() for i in range(10)] + [b"marker"])
