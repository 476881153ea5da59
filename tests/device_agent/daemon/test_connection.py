"""MqttConnection against real Mosquitto: presence and will, retries, re-subscription, TLS with passwords, size checks."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest

from device_agent.daemon.backoff import BackoffPolicy
from device_agent.daemon.config import BrokerConfig, OversizePolicy, TlsConfig
from device_agent.daemon.connection import ConnectionState, MqttConnection
from device_agent.protocol.chunking import PUBLISH_OVERHEAD, PayloadTooLargeError, is_chunk
from tests.device_agent.daemon.fleet_harness import Probe
from tests.mosquitto_broker import MosquittoBroker, free_port, wait_for

FAST = BackoffPolicy(initial_s=0.05, max_s=0.2, jitter=0.5)
PRESENCE = "fedge/t/dev/dev-1/presence"
MODEL = "fedge/t/model/global"


def connection(port: int, **broker: object) -> MqttConnection:
    return MqttConnection(BrokerConfig(host="127.0.0.1", port=port, **broker), client_id="dev-1",  # type: ignore[arg-type]
                          presence_topic=PRESENCE, subscriptions=(MODEL,), backoff=FAST)


@pytest.mark.mosquitto
def test_connection_presence_goes_online_and_the_will_marks_a_dropped_device_offline(mosquitto):
    broker = mosquitto.start()
    probe = Probe(broker.port, PRESENCE)
    first = connection(broker.port)
    first.start()
    try:
        assert first.wait_connected(5) and first.state is ConnectionState.CONNECTED
        assert probe.next() == b"online"
        first.close(graceful=False)  # socket dropped without DISCONNECT: the broker publishes the will
        assert probe.next() == b"offline"

        second = connection(broker.port)
        second.start()
        assert second.wait_connected(5) and probe.next() == b"online"
        second.close()  # a clean close says offline itself (DISCONNECT cancels the will)
        assert probe.next() == b"offline"
        assert second.state is ConnectionState.DISCONNECTED
    finally:
        probe.close()
    late = Probe(broker.port, PRESENCE)
    assert late.messages.get(timeout=5) == (b"offline", True), "presence is retained"
    late.close()


@pytest.mark.mosquitto
def test_connection_retries_until_the_broker_comes_up_then_subscribes(mosquitto):
    broker = MosquittoBroker(port=free_port())
    conn = connection(broker.port)
    conn.start()
    try:
        early = conn.publish_checked("fedge/t/dev/dev-1/up/update", b"queued while down", retain=True)
        time.sleep(0.5)
        assert conn.connects == 0 and conn.state is not ConnectionState.CONNECTED and not early.acknowledged()
        broker.start()
        assert conn.wait_connected(5) and conn.connects == 1
        assert wait_for(early.acknowledged, 5), "a QoS 1 publish made while down goes out after the connect"
        probe = Probe(broker.port, "fedge/t/dev/dev-1/up/update")
        assert probe.next() == b"queued while down"
        probe.publish(MODEL, b"model bytes")
        message = conn.inbox.get(timeout=5)
        assert (message.topic, message.payload) == (MODEL, b"model bytes")
        probe.close()
    finally:
        conn.close()
        broker.close()


@pytest.mark.mosquitto
def test_connection_resubscribes_after_a_broker_crash_lost_the_session(mosquitto):
    broker = mosquitto.start()
    conn = connection(broker.port)
    conn.start()
    try:
        assert conn.wait_connected(5)
        broker.restart(crash=True)  # SIGKILL: the persistent session and its subscription are gone
        assert wait_for(lambda: conn.connects == 2, 10)
        probe = Probe(broker.port, "unused")
        deadline = time.monotonic() + 5
        while conn.inbox.empty() and time.monotonic() < deadline:  # the SUBACK may trail the CONNACK
            probe.publish(MODEL, b"after the crash")
            time.sleep(0.05)
        assert conn.inbox.get(timeout=1).payload == b"after the crash"
        probe.close()
    finally:
        conn.close()


def _tls_broker(mosquitto, password: str) -> tuple[MosquittoBroker, Path]:
    from sdk.broker_config.passwords import hash_password, render_password_file
    from sdk.broker_config.pki import create_ca, issue_server_cert

    now = dt.datetime.now(dt.timezone.utc)
    ca = create_ca("test ca", now=now)
    server = issue_server_cert(ca, hosts=["127.0.0.1"], now=now, valid_days=1)
    work = mosquitto.workspace()
    (work / "ca.pem").write_bytes(ca.cert_pem)
    (work / "server.pem").write_bytes(server.cert_pem)
    (work / "server.key").write_bytes(server.key_pem)
    (work / "passwd").write_text(render_password_file({"dev-1": hash_password(password)}))
    (work / "acl").write_text("pattern readwrite fedge/t/dev/%u/#\npattern read fedge/t/model/#\n")
    port = free_port()
    (work / "mosquitto.conf").write_text(
        f"per_listener_settings false\nallow_anonymous false\npassword_file {work}/passwd\nacl_file {work}/acl\n"
        f"listener {port} 127.0.0.1\ncafile {work}/ca.pem\ncertfile {work}/server.pem\nkeyfile {work}/server.key\n"
        "log_dest stderr\n")
    return mosquitto.start(config_file=work / "mosquitto.conf"), work / "ca.pem"


@pytest.mark.mosquitto
def test_connection_over_tls_with_a_password_file_and_acls(mosquitto, tmp_path: Path):
    broker, ca_file = _tls_broker(mosquitto, "right horse")
    (tmp_path / "pw").write_text("right horse\n")
    (tmp_path / "bad").write_text("wrong\n")
    good = connection(broker.port, tls=TlsConfig(ca_file=ca_file), password_file=tmp_path / "pw")
    bad = connection(broker.port, tls=TlsConfig(ca_file=ca_file), password_file=tmp_path / "bad")
    good.start()
    try:
        assert good.wait_connected(5)
        good.close()
        bad.start()
        time.sleep(0.5)  # refused CONNACKs: the connection keeps backing off, never connected
        assert bad.connects == 0 and bad.state is not ConnectionState.CONNECTED
    finally:
        good.close()
        bad.close()


def test_publish_checked_chunks_or_refuses_before_anything_reaches_paho():
    limit = 2048
    topic = "fedge/t/dev/dev-1/up/update"
    chunking = connection(1, max_packet_size=limit)  # never started: nothing is sent anywhere
    ticket = chunking.publish_checked(topic, bytes(5000))
    assert ticket.chunked and ticket.frames == 3
    assert all(is_chunk(f) and len(f) + len(topic) + PUBLISH_OVERHEAD <= limit for f in ticket.payloads)
    assert chunking.publish_checked(topic, bytes(100)).payloads == [bytes(100)]
    with pytest.raises(PayloadTooLargeError):
        chunking.publish_checked(PRESENCE, bytes(5000), retain=True)  # retained messages cannot be chunked

    refusing = connection(1, max_packet_size=limit, oversized=OversizePolicy.REFUSE)
    with pytest.raises(PayloadTooLargeError, match="over the broker limit"):
        refusing.publish_checked(topic, bytes(limit))
    assert refusing._commands.empty()


def test_connection_reconnect_attempts_follow_the_backoff_on_the_injected_clock():
    now = [100.0]
    conn = MqttConnection(BrokerConfig(host="127.0.0.1", port=1), client_id="dev-1", presence_topic=PRESENCE,
                          subscriptions=(), backoff=BackoffPolicy(initial_s=1.0, max_s=4.0, jitter=0.0),
                          clock=lambda: now[0], poll_interval_s=0.01)
    attempts: list[float] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(now[0])
        raise ConnectionRefusedError("nobody listens")

    conn._client.connect = refuse  # type: ignore[method-assign]
    conn.start()
    try:
        assert wait_for(lambda: len(attempts) == 1)
        for gap in (1.0, 2.0, 4.0, 4.0):  # doubling, capped at max_s
            count = len(attempts)
            now[0] += gap - 0.01
            time.sleep(0.1)
            assert len(attempts) == count, "no attempt before the backoff delay has passed"
            now[0] += 0.01
            assert wait_for(lambda: len(attempts) == count + 1)
    finally:
        conn.close()
    assert attempts == pytest.approx([100.0, 101.0, 103.0, 107.0, 111.0])
    assert conn.state is ConnectionState.DISCONNECTED and conn.connects == 0
