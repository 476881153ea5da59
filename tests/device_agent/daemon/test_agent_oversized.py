"""Updates over the broker's packet limit are chunked or refused before paho sees them.

The broker enforces ``max_packet_size`` (Mosquitto disconnects a client that
sends a bigger packet, and paho 2.2 would resend it after every reconnect).
The model travels int8-encoded so it fits while the raw fp32 update does not.
"""

from __future__ import annotations

import queue

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.daemon.agent import RoundStatus
from device_agent.protocol.chunking import is_chunk
from device_agent.protocol.tensor_codec import Encoding

pytestmark = pytest.mark.mosquitto

LIMIT = 6000


@pytest.fixture
def small_fleet(fleet_factory):
    fleet = fleet_factory(extra_config=f"max_packet_size {LIMIT}\n")
    fleet.sections["broker"]["max_packet_size"] = LIMIT
    return fleet


def test_the_broker_really_disconnects_an_oversized_publish(small_fleet):
    broker = small_fleet.broker
    events: queue.Queue[str] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="control", reconnect_on_failure=False)
    client.on_connect = lambda c, u, f, rc, p: events.put("connected")
    client.on_disconnect = lambda c, u, f, rc, p: events.put("disconnected")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert events.get(timeout=5) == "connected"
        client.publish("control/big", b"x" * (LIMIT + 100), qos=1)
        assert events.get(timeout=5) == "disconnected"
    finally:
        client.loop_stop()


def test_agent_chunks_an_oversized_update_and_stays_connected(small_fleet):
    agent, responder = small_fleet.agent(), small_fleet.responder
    responder.publish_model(0, agent.trainer.global_reference, encoding=Encoding.INT8)
    result = agent.run(max_rounds=1)
    assert [r.status for r in result.rounds] == [RoundStatus.ACCEPTED]
    assert len(responder.blobs[0]) > LIMIT
    assert len(responder.frames) >= 2 and all(is_chunk(f) and len(f) < LIMIT for f in responder.frames)
    assert agent.connection.connects == 1, "an oversized PUBLISH would have cost a reconnect"


def test_agent_refuses_an_oversized_update_when_chunking_is_off(small_fleet):
    small_fleet.sections["broker"]["oversized"] = "refuse"
    agent, responder = small_fleet.agent(), small_fleet.responder
    responder.publish_model(0, agent.trainer.global_reference, encoding=Encoding.INT8)
    result = agent.run(max_rounds=1)
    assert [r.status for r in result.rounds] == [RoundStatus.REFUSED]
    assert "broker limit" in result.rounds[0].reason
    assert responder.frames == [] and agent.connection.connects == 1
    assert agent.state.load_pending() is None and agent.progress.completed_round == 0
