"""The device-serving tier's publisher: full model + compressed delta, and the round's uplink override."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.compression import CompressionSpec
from device_agent.compression.downlink import HeldModel, apply_model_delta
from device_agent.protocol.envelope import open_model, sign_model
from device_agent.protocol.headers import ModelHeader
from device_agent.protocol.model_delta import open_model_delta
from sdk.aggregator.downlink import DownlinkSettings, ModelPublisher, UplinkSchedule

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(3, 35)))


def _stored(round: int, tensors, version: int = 1) -> bytes:
    header = ModelHeader.create(fleet="f", sender="eu-agg", region="eu", round=round, bundle_version=version)
    return sign_model(header, tensors, signer_key=KEY)


def test_inactive_settings_publish_the_stored_model_byte_for_byte():
    blob = _stored(1, {"w": np.ones(4, np.float32)})
    published = ModelPublisher(DownlinkSettings(), signing_key=KEY).prepare(blob)
    assert published.full == blob and published.delta is None


def test_the_uplink_schedule_is_stamped_round_by_round():
    schedule = UplinkSchedule.parse("2:q8,5:topk:0.3+q4")
    assert schedule.describe() == "2:q8,5:topk:0.3+q4"
    assert UplinkSchedule.parse("q4").for_round(0) == CompressionSpec.parse("q4")
    publisher = ModelPublisher(DownlinkSettings(uplink=schedule), signing_key=KEY)
    seen = {r: open_model(publisher.prepare(_stored(r, {"w": np.ones(4, np.float32)})).full,
                          trusted_signers=KEY.public_key()).header.compression for r in (1, 2, 4, 5, 9)}
    assert seen == {1: None, 2: "q8", 4: "q8", 5: "topk:0.3+q4", 9: "topk:0.3+q4"}
    for bad in ("3:q8,1:q4", "x:q8", "q3"):
        with pytest.raises(ValueError):
            UplinkSchedule.parse(bad)


def test_deltas_rebuild_the_full_model_a_fallback_device_gets_and_a_new_bundle_starts_over():
    rng = np.random.default_rng(0)
    publisher = ModelPublisher(DownlinkSettings(compression=CompressionSpec.parse("q4"), uplink=UplinkSchedule.parse("q8")),
                               signing_key=KEY)
    true = {"w": rng.normal(size=(20, 30)).astype(np.float32)}
    first = publisher.prepare(_stored(0, true))
    assert first.delta is None
    device = HeldModel.of(0, open_model(first.full, trusted_signers=KEY.public_key()).tensors)
    for r in range(1, 5):
        true = {"w": (true["w"] + 0.1 * rng.normal(size=(20, 30))).astype(np.float32)}
        blob = _stored(r, true)
        published = publisher.prepare(blob)
        assert publisher.prepare(blob) is published  # a republish after a reconnect: the same messages
        delta = open_model_delta(published.delta, trusted_signers=KEY.public_key())
        h = delta.header
        assert (h.round, h.base_round, h.compression, h.encoding.value) == (r, r - 1, "q8", "q4")
        applied = apply_model_delta(device, delta.tensors, round=r, base_round=h.base_round, base_digest=h.base_digest,
                                    digest=h.digest)
        assert applied.model is not None, applied.detail
        device = applied.model
        full = open_model(published.full, trusted_signers=KEY.public_key())
        assert HeldModel.of(r, full.tensors).digest == device.digest  # the fallback is the very same model
        assert len(published.delta) < len(published.full) / 3  # 600 params: the ~0.5 KB header weighs
    assert publisher.prepare(_stored(5, true, version=2)).delta is None



@pytest.mark.parametrize("text", ["q4", "topk:0.3+q4"])
def test_the_publishers_chain_is_the_simulators_downlink_bit_for_bit(text):
    """What `fedge bench accuracy` simulates (sdk/simulation/traffic.Downlink) is what the region sends."""
    from device_agent.compression.downlink import DeltaChain
    from sdk.simulation.traffic import Downlink

    rng = np.random.default_rng(1)
    target = {"w": rng.normal(size=(30, 20)).astype(np.float32), "b": rng.normal(size=20).astype(np.float32)}
    spec = CompressionSpec.parse(text)
    simulated, chain = Downlink(target, spec), DeltaChain(spec)
    chain.advance(0, target)
    for r in range(1, 6):
        target = {n: (v + 0.05 * rng.normal(size=v.shape)).astype(np.float32) for n, v in target.items()}
        held = simulated.publish(target)
        step = chain.advance(r, target)
        assert len(step.payload) == simulated.last_bytes
        for n in target:
            assert np.array_equal(held[n], chain.held.tensors[n])


def test_a_restarted_publisher_resumes_the_chain_from_its_state_file(tmp_path, caplog):
    rng = np.random.default_rng(2)
    state = tmp_path / "eu.sqlite.downlink"
    settings = DownlinkSettings(compression=CompressionSpec.parse("q8"))
    first = ModelPublisher(settings, signing_key=KEY, state=state)
    true = {"w": rng.normal(size=(10, 10)).astype(np.float32)}
    blobs = []
    for r in range(3):
        true = {"w": (true["w"] + 0.1 * rng.normal(size=(10, 10))).astype(np.float32)}
        blobs.append(_stored(r, true))
        last = first.prepare(blobs[-1])
    again = ModelPublisher(settings, signing_key=KEY, state=state)
    assert again.held_model().digest == first.held_model().digest
    assert again.prepare(blobs[-1]) == last  # the same messages for the same round
    true = {"w": (true["w"] + 0.1 * rng.normal(size=(10, 10))).astype(np.float32)}
    step = again.prepare(_stored(3, true))
    h = open_model_delta(step.delta, trusted_signers=KEY.public_key()).header
    assert (h.base_round, h.base_digest) == (2, first.held_model().digest)  # the chain goes on: no full round
    state.write_bytes(state.read_bytes()[:-7])  # torn or tampered: one line, then a fresh start
    fresh = ModelPublisher(settings, signing_key=KEY, state=state)
    assert fresh.held_model() is None
    assert "downlink state" in caplog.text and "goes out in full" in caplog.text
