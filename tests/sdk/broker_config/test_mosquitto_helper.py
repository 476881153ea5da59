"""The MosquittoBroker test helper: default broker, restart on the same port and data, crash."""

from __future__ import annotations

import queue

import paho.mqtt.client as mqtt
import pytest

from tests.mosquitto_broker import MosquittoBroker, MosquittoFactory, mosquitto_fixture

pytestmark = pytest.mark.mosquitto

mosquitto = mosquitto_fixture()


def _retained(broker: MosquittoBroker, topic: str) -> bytes | None:
    """The retained payload on ``topic``, or None if the broker holds none."""
    got: queue.Queue[bytes] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, m: got.put(bytes(m.payload))
    client.connect(broker.host, broker.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        return got.get(timeout=1.0)
    except queue.Empty:
        return None
    finally:
        client.disconnect()
        client.loop_stop()


def _publish_retained(broker: MosquittoBroker, topic: str, payload: bytes) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1, retain=True).wait_for_publish(timeout=5)
    client.disconnect()
    client.loop_stop()


def test_broker_restart_keeps_port_and_persisted_state(mosquitto: MosquittoFactory) -> None:
    broker = mosquitto.start()
    port = broker.port
    _publish_retained(broker, "t/state", b"kept")

    broker.restart()

    assert broker.running and broker.port == port
    assert _retained(broker, "t/state") == b"kept"
    assert "mosquitto version" in broker.log()


def test_broker_crash_loses_what_was_not_autosaved(mosquitto: MosquittoFactory) -> None:
    broker = mosquitto.start()
    _publish_retained(broker, "t/state", b"unsaved")

    broker.restart(crash=True)

    assert _retained(broker, "t/state") is None


def test_broker_reports_a_config_it_cannot_start_with(mosquitto: MosquittoFactory) -> None:
    with pytest.raises(RuntimeError, match="exited"):
        mosquitto.start(extra_config="no_such_option 1\n")
