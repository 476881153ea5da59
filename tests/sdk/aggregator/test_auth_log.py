"""An update that fails authentication is logged with the device it claimed, once per claimed id per interval."""

from __future__ import annotations

import logging

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.protocol.envelope import seal_update
from device_agent.protocol.headers import UpdateHeader
from sdk.aggregator.auth_log import AuthFailureLog


def _blob(sender: str, key: Ed25519PrivateKey, recipient: X25519PrivateKey) -> bytes:
    header = UpdateHeader.create(fleet="f", region="eu", sender=sender, round=4, bundle_version=1, sample_count=3)
    return seal_update(header, {"w": np.zeros(2, np.float32)}, recipient_public_key=recipient.public_key(), sender_key=key)


def test_auth_log_names_the_claimed_device_the_topic_and_why(caplog) -> None:
    now = [0.0]
    log = AuthFailureLog(interval_s=60, clock=lambda: now[0])
    device, impostor, agg = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    keys = {"eu-dev-0001": device.public_key()}
    with caplog.at_level(logging.WARNING, logger="sdk.aggregator.intake"):
        assert log.report_update(_blob("eu-dev-0001.key", device, agg), keys=keys, topic_sender="eu-dev-0001.key")
        assert log.report_update(_blob("eu-dev-0001", impostor, agg), keys=keys, topic_sender="eu-dev-0001")
        assert not log.report_update(_blob("eu-dev-0001", impostor, agg), keys=keys, topic_sender="eu-dev-0001")
        assert log.report_update(b"junk", keys=keys, topic_sender="eu-dev-0009")
        now[0] = 61.0
        assert log.report_update(_blob("eu-dev-0001", impostor, agg), keys=keys, topic_sender="eu-dev-0001")
    lines = [r.getMessage() for r in caplog.records]
    assert "claiming to be from 'eu-dev-0001.key' (round 4) on the topic of 'eu-dev-0001.key'" in lines[0]
    assert "is not in the registry" in lines[0]
    assert "does not verify with 'eu-dev-0001''s registered key" in lines[1]
    assert "header does not parse" in lines[2] and "'eu-dev-0009'" in lines[2]
    assert "(1 more since the last report)" in lines[3] and len(lines) == 4


def test_auth_log_memory_is_bounded() -> None:
    log = AuthFailureLog(max_senders=3, clock=lambda: 0.0)
    for i in range(10):
        log.report(claimed=f"d{i}", registered=False, round=0, topic_sender=None, size=1)
    assert len(log._last) == 3
