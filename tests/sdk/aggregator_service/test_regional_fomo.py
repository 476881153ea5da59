"""RegionalService with FedFomo on, over one real Mosquitto broker: candidate requests and sealed answers."""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.keys import raw_public_bytes
from device_agent.protocol.candidate_request import CandidateRequest, sign_candidate_request
from device_agent.protocol.envelope import open_candidates, open_model, sign_model
from device_agent.protocol.headers import ModelHeader
from device_agent.protocol.receipts import ReceiptStatus, open_receipt
from sdk.aggregator import RegionalAggregator, RegionalConfig, RoundPolicy
from sdk.aggregator.mqtt_service import RegionalService
from sdk.aggregator.service_config import BrokerSettings, LoopSettings
from tests.mosquitto_broker import MosquittoFactory
from tests.sdk.aggregator_service.conftest import Started
from tests.sdk.aggregator_service.harness import (
    BUNDLE_VERSION,
    FLEET,
    LAYOUT,
    LOOSE_BOUNDS,
    SPEC,
    Device,
    Observer,
    ServiceThread,
    TierKeys,
    random_params,
)

pytestmark = pytest.mark.mosquitto


def _request(device: str, round_number: int, k: int, reply: X25519PrivateKey, key: Ed25519PrivateKey,
             prefer: tuple[str, ...] = ()) -> bytes:
    request = CandidateRequest.create(fleet=FLEET, region="eu", device=device, round=round_number, k=k, prefer=prefer,
                                      reply_key=raw_public_bytes(reply.public_key()))
    return sign_candidate_request(request, signer_key=key)


def test_regional_service_serves_peers_absolute_models_never_the_requester(
        mosquitto: MosquittoFactory, started: Started, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    broker = mosquitto.start()
    region, root = TierKeys(), TierKeys()
    devices = [Device(device_id=f"eu-dev-{i}", region="eu", samples=n, delta=random_params(rng, 0.1))
               for i, n in enumerate((10, 30, 60))]
    config = RegionalConfig(
        fleet=FLEET, region="eu", encryption_key=region.encryption, signing_key=region.signing, spec=SPEC,
        bundle_version=BUNDLE_VERSION, policy=RoundPolicy(quorum=3, deadline_s=60.0),
        device_keys={d.device_id: d.key.public_key() for d in devices},
        root_verify_key=root.signing.public_key(), root_encryption_key=root.encryption.public_key(),
        regional_weight=0.5, fomo_candidates=2, influence=LOOSE_BOUNDS,
    )
    settings = BrokerSettings(host="127.0.0.1", port=broker.port, client_id="eu-agg-1", max_packet_size=65536)

    def build() -> tuple[RegionalService, RegionalAggregator]:
        aggregator = RegionalAggregator.open(tmp_path / "eu.sqlite", config, rng=np.random.default_rng(0))
        return RegionalService(aggregator, region="eu", layout=LAYOUT, broker=settings,
                               loop=LoopSettings(tick_s=0.05)), aggregator

    observer = started.observer(Observer(broker.port, client_id="observer")).subscribe(
        f"{LAYOUT.base}/dev/+/down/#", LAYOUT.global_model, LAYOUT.region_aggregate("eu"))
    thread = started.thread(ServiceThread(build))

    def root_model(round_number: int) -> dict[str, np.ndarray]:
        params = random_params(rng)
        observer.publish(LAYOUT.root_model, sign_model(
            ModelHeader.create(fleet=FLEET, sender="root", round=round_number, bundle_version=BUNDLE_VERSION),
            params, signer_key=root.signing), retain=True)
        [(_, served)] = observer.receive(lambda t: t == LAYOUT.global_model)
        model = open_model(served, trusted_signers=region.signing.public_key())
        assert model.header.round == round_number
        return model.tensors

    s0 = root_model(0)
    for device in devices:
        observer.publish(LAYOUT.device_update(device.device_id), device.seal(device.header(0), region.encryption))
    receipts = [open_receipt(blob, trusted_signers=region.signing.public_key())
                for _, blob in observer.receive(lambda t: t.endswith("/down/receipt"), count=3)]
    assert all(r.status is ReceiptStatus.ACCEPTED for r in receipts)
    observer.receive(lambda t: t == LAYOUT.region_aggregate("eu"))  # round 0 closed and forwarded
    s1 = root_model(1)  # round 1 serves a mix of R_0 and G_1: not S_0, so the pool must hold S_0 + d_k
    assert not np.allclose(s1["base.bias"], s0["base.bias"])

    reply = X25519PrivateKey.generate()
    observer.publish(LAYOUT.device_candidate_request("eu-dev-0"),
                     _request("eu-dev-0", 1, 3, reply, devices[0].key, prefer=("eu-dev-0", "eu-dev-2")))
    [(topic, blob)] = observer.receive(lambda t: t.endswith("/down/candidates"))
    assert topic == LAYOUT.device_candidates("eu-dev-0")
    opened = open_candidates(blob, recipient_key=reply, trusted_signers=region.signing.public_key())
    assert opened.header.recipient == "eu-dev-0" and opened.header.round == 1
    assert opened.header.peers == ("eu-dev-2", "eu-dev-1") and opened.header.peer_rounds == (0, 0)
    for peer, model in zip(opened.header.peers, opened.models):
        delta = devices[int(peer[-1])].delta
        for name in SPEC:
            np.testing.assert_allclose(model[name], s0[name].astype(np.float64) + delta[name], atol=1e-6, rtol=0)

    # Forged (eu-dev-1 signs a request naming eu-dev-0), wrong round, and a request on another device's topic:
    # none is answered. The valid request after them is the next answer on any candidates topic.
    observer.publish(LAYOUT.device_candidate_request("eu-dev-0"), _request("eu-dev-0", 1, 2, reply, devices[1].key))
    observer.publish(LAYOUT.device_candidate_request("eu-dev-0"), _request("eu-dev-0", 0, 2, reply, devices[0].key))
    observer.publish(LAYOUT.device_candidate_request("eu-dev-2"), _request("eu-dev-1", 1, 2, reply, devices[1].key))
    other = X25519PrivateKey.generate()
    observer.publish(LAYOUT.device_candidate_request("eu-dev-1"),
                     _request("eu-dev-1", 1, 1, other, devices[1].key, prefer=("eu-dev-0",)))
    [(topic, blob)] = observer.receive(lambda t: t.endswith("/down/candidates"))
    assert topic == LAYOUT.device_candidates("eu-dev-1")
    answer = open_candidates(blob, recipient_key=other, trusted_signers=region.signing.public_key())
    assert answer.header.peers == ("eu-dev-0",)
    with pytest.raises(queue.Empty):
        observer.messages.get(timeout=0.5)

    thread.stop()
    assert thread.status is not None and thread.report is not None
    counters = thread.status.counters
    assert counters.get("candidates_rejected:auth") == 2
    assert counters.get("candidates_rejected:wrong_round") == 1
    assert counters.get("candidates_served") == 2
    assert thread.report.counters == {}
