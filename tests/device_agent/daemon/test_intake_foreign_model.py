"""The message intake keeps the newest model for another bundle version, so a device that switches to that version
plays the region's current round at once instead of waiting for the next model (a retained model comes once)."""

from __future__ import annotations

import queue

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.daemon.connection_types import InboundMessage
from device_agent.daemon.intake import MessageIntake
from device_agent.protocol.envelope import sign_model
from device_agent.protocol.headers import ModelHeader
from device_agent.protocol.topics import TopicLayout

LAYOUT = TopicLayout(fleet="lab")
SPEC = {"w": ((2, 3), "float32")}
KEY = Ed25519PrivateKey.generate()


def _intake(version: int) -> MessageIntake:
    return MessageIntake(inbox=queue.Queue(), topics=LAYOUT, device_id="eu-1", region="eu", bundle_version=version,
                         spec=SPEC, model_signers=(KEY.public_key(),), receipt_signers=(KEY.public_key(),))


def _model(round_: int, version: int) -> InboundMessage:
    header = ModelHeader.create(fleet="lab", sender="eu", region="eu", round=round_, bundle_version=version)
    payload = sign_model(header, {"w": np.full((2, 3), round_, np.float32)}, signer_key=KEY)
    return InboundMessage(topic=LAYOUT.global_model, payload=payload, retained=True)


def test_intake_keeps_the_newest_foreign_model_for_a_switch_and_forgets_it_when_its_own_version_returns() -> None:
    on_v1 = _intake(1)
    on_v1.handle(_model(3, 2))  # the region switched to v2 before this device
    assert on_v1.latest_model is None and on_v1.foreign_version == 2 and on_v1.foreign_model is not None
    on_v2 = _intake(2)  # the device installed v2: a fresh intake, offered what the old one kept
    on_v2.replay_model(on_v1.foreign_model)
    assert on_v2.latest_model is not None and on_v2.latest_model.header.round == 3
    on_v1.handle(_model(4, 1))  # the region went back to v1: nothing to replay any more
    assert on_v1.foreign_model is None and on_v1.latest_model is not None
