"""The device's intake with model deltas (no broker: real signed messages handed to the real intake).

A forged, mismatched, NaN or cleared delta is refused with one line and counted, the device asks for the full
model, and nothing it holds is lost; a device that missed a round takes the full model and rejoins."""

from __future__ import annotations

import logging
import queue

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.compression import CompressionSpec
from device_agent.daemon.connection_types import InboundMessage
from device_agent.daemon.intake import MessageIntake
from device_agent.protocol.envelope import sign_model
from device_agent.protocol.headers import ModelDeltaHeader, ModelHeader
from device_agent.protocol.model_delta import sign_model_delta
from device_agent.protocol.topics import TopicLayout
from sdk.aggregator.downlink import DownlinkSettings, ModelPublisher, UplinkSchedule

LAYOUT = TopicLayout(fleet="f")
REGION_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
SPEC = {"w": ((16, 8), "float32"), "b": ((8,), "float32")}


def _intake() -> tuple[MessageIntake, list[bool]]:
    intake = MessageIntake(inbox=queue.Queue(), topics=LAYOUT, device_id="d1", region="eu", bundle_version=1, spec=SPEC,
                           model_signers=(REGION_KEY.public_key(),), receipt_signers=(REGION_KEY.public_key(),))
    asked: list[bool] = []
    intake.follow_full = asked.append
    return intake, asked


def _models(rounds: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    model = {n: rng.normal(size=s).astype(np.float32) for n, (s, _) in SPEC.items()}
    out = [model]
    for _ in range(rounds):
        out.append({n: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32) for n, v in out[-1].items()})
    return out


def _published(rounds: int):
    publisher = ModelPublisher(DownlinkSettings(compression=CompressionSpec.parse("q8"), uplink=UplinkSchedule.parse("q4")),
                               signing_key=REGION_KEY)
    out = []
    for number, model in enumerate(_models(rounds)):
        header = ModelHeader.create(fleet="f", sender="eu-agg", region="eu", round=number, bundle_version=1, frames=(1, 2))
        out.append(publisher.prepare(sign_model(header, model, signer_key=REGION_KEY)))
    return publisher, out


def _give(intake: MessageIntake, topic: str, payload: bytes) -> None:
    intake.handle(InboundMessage(topic=topic, payload=payload, retained=True))


def test_a_device_follows_deltas_then_after_a_missed_round_falls_back_and_rejoins(caplog):
    publisher, published = _published(4)
    intake, asked = _intake()
    _give(intake, LAYOUT.global_model, published[0].full)
    _give(intake, LAYOUT.global_model_delta, published[1].delta)
    assert intake.latest_model.header.round == 1 and intake.latest_model.header.compression == "q4"
    assert intake.latest_model.header.frames == (1, 2)  # the frame versions the region reads ride the delta too
    assert asked == [False] and intake.deltas_applied == 1
    # round 2's delta never arrives; round 3's names round 2 as its base
    with caplog.at_level(logging.WARNING):
        _give(intake, LAYOUT.global_model_delta, published[3].delta)
    assert intake.latest_model.header.round == 1 and asked[-1] is True
    assert intake.ignored["delta_base_mismatch"] == 1
    assert len([r for r in caplog.records if "delta_base_mismatch" in r.getMessage()]) == 1
    _give(intake, LAYOUT.global_model, published[3].full)  # the retained full model, once subscribed
    _give(intake, LAYOUT.global_model_delta, published[4].delta)
    assert intake.latest_model.header.round == 4 and asked[-1] is False and intake.deltas_applied == 2
    assert intake.held.digest == publisher.held_model().digest


def test_forged_nan_foreign_and_cleared_deltas_are_refused_and_nothing_held_is_lost():
    publisher, published = _published(1)
    intake, asked = _intake()
    _give(intake, LAYOUT.global_model, published[0].full)
    held = intake.held
    forged = bytearray(published[1].delta)
    forged[-100] ^= 1
    _give(intake, LAYOUT.global_model_delta, bytes(forged))
    stranger = Ed25519PrivateKey.generate()
    nan = {"w": np.full((16, 8), np.nan, np.float32), "b": np.zeros(8, np.float32)}
    header = ModelDeltaHeader.create(fleet="f", sender="eu-agg", region="eu", round=1, bundle_version=1, base_round=0,
                                     base_digest=held.digest, digest=bytes(32))
    _give(intake, LAYOUT.global_model_delta, sign_model_delta(header, nan, signer_key=stranger))
    _give(intake, LAYOUT.global_model_delta, sign_model_delta(header, nan, signer_key=REGION_KEY))
    other_fleet = ModelDeltaHeader.create(fleet="g", sender="eu-agg", region="eu", round=1, bundle_version=1,
                                          base_round=0, base_digest=held.digest, digest=bytes(32))
    _give(intake, LAYOUT.global_model_delta, sign_model_delta(other_fleet, nan, signer_key=REGION_KEY))
    _give(intake, LAYOUT.global_model_delta, b"garbage")
    _give(intake, LAYOUT.global_model_delta, b"")  # the publisher's chain starts over: take the full model
    assert dict(intake.ignored) == {"untrusted_delta": 2, "delta_non_finite": 1, "delta_scope": 1, "malformed_delta": 1}
    assert intake.held is held and intake.latest_model.header.round == 0 and intake.deltas_applied == 0
    assert asked == [True] * 6
    _give(intake, LAYOUT.global_model_delta, published[1].delta)  # the real one still applies
    assert intake.latest_model.header.round == 1 and intake.held.digest == publisher.held_model().digest


def test_a_new_device_takes_the_full_model_and_a_delta_it_already_holds_lets_it_leave_the_full_topic():
    publisher, published = _published(2)
    intake, asked = _intake()
    _give(intake, LAYOUT.global_model_delta, published[2].delta)  # retained delta before anything is held
    assert intake.ignored["delta_no_base"] == 1 and asked == [True]
    _give(intake, LAYOUT.global_model, published[2].full)
    assert intake.held.digest == publisher.held_model().digest and intake.held.round == 2
    _give(intake, LAYOUT.global_model_delta, published[2].delta)  # redelivered: it makes what the device holds
    assert asked[-1] is False and intake.deltas_applied == 0
