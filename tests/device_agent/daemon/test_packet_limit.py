"""PacketLimit (device_agent/daemon/packet_limit.py): the limit a broker announces, the size check, and one
rate-limited line when a drop looks like an oversized packet. The live behaviour is test_connection_hygiene.py."""

from __future__ import annotations

import logging

import pytest

from device_agent.daemon.packet_limit import PACKET_TOO_LARGE, PacketLimit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_packet_limit_takes_a_smaller_announced_limit_once_and_never_a_larger_one(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    packets = PacketLimit(65536, report_interval_s=60, clock=Clock())
    packets.adopt(None, address="b:1883")
    assert packets.limit == 65536 and _errors(caplog) == []
    packets.adopt(1_000_000, address="b:1883")  # the broker allows more than configured: the configuration stands
    assert packets.limit == 65536
    packets.adopt(4096, address="b:1883")
    packets.adopt(4096, address="b:1883")  # the same again: said once
    assert packets.limit == 4096
    assert len(_errors(caplog)) == 1 and "accepts packets up to 4096 bytes" in _errors(caplog)[0]
    assert packets.fits(4000, "t") and not packets.fits(5000, "t")


def test_packet_limit_explains_a_suspicious_drop_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    packets = PacketLimit(65536, report_interval_s=60, clock=clock)
    packets.sent(1, 60_000)
    packets.explain_drop("connection reset", 0.3, suspicious=False, address="b:1883", client_id="dev")
    assert _errors(caplog) == []  # a connection that had proved itself: not about sizes
    packets.sent(2, 60_000)
    packets.explain_drop("connection reset", 0.3, suspicious=True, address="b:1883", client_id="dev")
    assert len(_errors(caplog)) == 1 and "while a 60000-byte PUBLISH was unacknowledged" in _errors(caplog)[0]
    packets.sent(3, 60_000)
    packets.explain_drop("connection reset", 0.3, suspicious=True, address="b:1883", client_id="dev")
    assert len(_errors(caplog)) == 1  # rate-limited
    clock.now = 61.0
    packets.sent(4, 500)
    packets.acknowledged(4)  # acknowledged: nothing in flight, nothing to blame
    packets.explain_drop("connection reset", 0.3, suspicious=True, address="b:1883", client_id="dev")
    assert len(_errors(caplog)) == 1
    packets.explain_drop(PACKET_TOO_LARGE, 0.3, suspicious=False, address="b:1883", client_id="dev")
    assert len(_errors(caplog)) == 2 and "for a packet too large" in _errors(caplog)[1] and "(1 similar" in _errors(caplog)[1]
