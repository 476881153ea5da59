"""Connection hygiene on real brokers: no reconnect storm, one clear line for a packet-size mismatch, MQTT 5 with a
3.1.1 fall back, loud but rate-limited reports of an unreachable broker, and password rotation without a restart."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from device_agent.daemon.backoff import BackoffPolicy
from device_agent.daemon.config import BrokerConfig, OversizePolicy
from device_agent.daemon.connection import MqttConnection, MqttProtocol
from tests.mosquitto_broker import free_port, wait_for

PRESENCE = "fedge/t/dev/dev-1/presence"
UPDATE = "fedge/t/dev/dev-1/up/update"
QUICK = BackoffPolicy(initial_s=0.2, max_s=2.0, jitter=0.0)
LOGGER = "device_agent.daemon.connection"


def connection(port: int, *, protocol: MqttProtocol = MqttProtocol.AUTO, backoff: BackoffPolicy = QUICK,
               **broker: object) -> MqttConnection:
    return MqttConnection(BrokerConfig(host="127.0.0.1", port=port, **broker), client_id="dev-1",  # type: ignore[arg-type]
                          presence_topic=PRESENCE, subscriptions=("fedge/t/model/global",), backoff=backoff,
                          protocol=protocol)


def _errors(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and needle in r.getMessage()]


@pytest.mark.mosquitto
def test_a_device_limit_above_the_brokers_does_not_storm_and_says_why_in_one_line(mosquitto, caplog):
    """MQTT 3.1.1 (no announced limit): the broker drops the client after CONNACK each time paho resends the
    oversized publish. Before, the backoff reset on every CONNACK: 160 reconnects a minute. Now it keeps growing."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    broker = mosquitto.start(extra_config="max_packet_size 4096\n")
    conn = connection(broker.port, protocol=MqttProtocol.V311, max_packet_size=65536, oversized=OversizePolicy.REFUSE)
    conn.start()
    try:
        assert conn.wait_connected(5)
        conn.publish_checked(UPDATE, bytes(20_000))  # fits the device's limit, not the broker's
        started = time.monotonic()
        time.sleep(8.0)
        connects = conn.connects
    finally:
        conn.close()
    elapsed = time.monotonic() - started
    # Delays 0.2, 0.4, 0.8, 1.6, 2, 2...: at most ~7 connects in 8 s (a reset on every CONNACK: ~30 and more).
    assert 2 <= connects <= 8, f"{connects} connects in {elapsed:.1f} s"
    lines = _errors(caplog, "packet size limit is probably below broker.max_packet_size (65536)")
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert "127.0.0.1:%d" % broker.port in lines[0] and "20" in lines[0]


@pytest.mark.mosquitto
def test_mqtt5_adopts_the_brokers_announced_limit_and_chunks_instead(mosquitto, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    broker = mosquitto.start(extra_config="max_packet_size 4096\n")
    conn = connection(broker.port, max_packet_size=65536)
    conn.start()
    try:
        assert conn.wait_connected(5)
        assert conn.protocol is MqttProtocol.V5 and conn.packet_limit == 4096
        ticket = conn.publish_checked(UPDATE, bytes(20_000))
        assert ticket.chunked and wait_for(ticket.acknowledged, 5)
        time.sleep(0.5)
        assert conn.connects == 1, "nothing oversized went out: no reconnect"
    finally:
        conn.close()
    lines = _errors(caplog, "accepts packets up to 4096 bytes, less than broker.max_packet_size = 65536")
    assert len(lines) == 1


@pytest.mark.mosquitto
def test_mqtt5_packet_too_large_is_named_when_the_broker_drops_the_client(mosquitto, caplog):
    """A payload between message_size_limit and max_packet_size: Mosquitto answers MQTT 5 with reason 0x95, which
    paho 2.2 cannot parse in a PUBACK (protocol error): the drop repeats, bounded, and is reported once."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    broker = mosquitto.start(extra_config="message_size_limit 4096\n")
    conn = connection(broker.port, max_packet_size=65536, oversized=OversizePolicy.REFUSE)
    conn.start()
    try:
        assert conn.wait_connected(5)
        conn.publish_checked(UPDATE, bytes(10_000))
        time.sleep(5.0)
        assert conn.connects <= 7
    finally:
        conn.close()
    assert len(_errors(caplog, "below broker.max_packet_size (65536)")) == 1


def test_an_unreachable_broker_is_reported_at_warning_with_address_and_reason_rate_limited(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    now = [0.0]
    port = free_port()  # nothing listens there
    conn = MqttConnection(BrokerConfig(host="127.0.0.1", port=port), client_id="dev-1", presence_topic=PRESENCE,
                          subscriptions=(), backoff=BackoffPolicy(initial_s=1.0, max_s=1.0, jitter=0.0),
                          clock=lambda: now[0], poll_interval_s=0.01)
    conn.start()
    try:
        for count in range(1, 71):  # 70 failed attempts, one simulated second apart
            # wait until the failure is booked (next attempt scheduled) before moving the clock
            assert wait_for(lambda: conn.attempts == count and conn._next_attempt == now[0] + 1.0, 5)
            now[0] += 1.0
    finally:
        conn.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # the first failure, then one a minute (simulated)
    assert f"cannot reach broker 127.0.0.1:{port}" in warnings[0] and "refused" in warnings[0].lower()
    assert "more failed attempts since the last report" in warnings[1]


def test_mqtt5_falls_back_to_311_on_a_broker_that_only_speaks_311(tmp_path: Path):
    """The embedded amqtt broker of the demo speaks 3.1.1 only."""
    pytest.importorskip("amqtt")
    from sdk.demo.embedded import EmbeddedBroker, write_password_file

    write_password_file(tmp_path / "pw", {"dev-1": "secret"})
    broker = EmbeddedBroker(name="t", port=free_port(), password_file=tmp_path / "pw")
    broker.start()
    conn = connection(broker.port, password="secret")
    conn.start()
    try:
        assert conn.wait_connected(10)
        assert conn.protocol is MqttProtocol.V311 and conn.connects == 1 and conn.attempts == 2
    finally:
        conn.close()
        broker.stop()


@pytest.mark.mosquitto
def test_password_rotation_on_a_running_connection(mosquitto, tmp_path: Path):
    """docs/broker.md, section 7: new password first in the device's file, then the broker's hash and a reload."""
    from sdk.broker_config.passwords import hash_password, render_password_file

    work = mosquitto.workspace()
    port = free_port()
    (work / "passwd").write_text(render_password_file({"dev-1": hash_password("old")}))
    (work / "mosquitto.conf").write_text(f"per_listener_settings false\nallow_anonymous false\n"
                                         f"password_file {work}/passwd\nlistener {port} 127.0.0.1\nlog_dest stderr\n")
    broker = mosquitto.start(config_file=work / "mosquitto.conf")
    device_file = tmp_path / "mqtt-password"
    device_file.write_text("old\n")
    conn = connection(broker.port, password_file=device_file)
    conn.start()
    try:
        assert conn.wait_connected(5)
        device_file.write_text("new\nold\n")  # step 1: the device gets the new password first
        (work / "passwd").write_text(render_password_file({"dev-1": hash_password("new")}))
        broker.reload()  # step 2: the broker switches; Mosquitto drops clients whose password no longer matches
        assert wait_for(lambda: conn.connects == 2 and conn.state.value == "connected", 15), conn.connects
        device_file.write_text("new\n")  # step 3: the old password goes
        broker.restart()
        assert wait_for(lambda: conn.connects == 3, 15)
    finally:
        conn.close()
