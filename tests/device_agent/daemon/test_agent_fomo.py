"""The device agent with FedFomo on, against a real RegionalService (fomo on) on a real Mosquitto, real ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.daemon.agent import RoundStatus
from device_agent.daemon.bootstrap import open_agent
from device_agent.daemon.config import load_config
from device_agent.protocol.envelope import seal_update, sign_model
from device_agent.protocol.headers import ModelHeader, UpdateHeader
from sdk.aggregator import RegionalAggregator, RegionalConfig, RoundPolicy
from sdk.aggregator.mqtt_service import RegionalService
from sdk.aggregator.service_config import BrokerSettings, LoopSettings
from tests.device_agent.daemon.fleet_harness import DEVICE, FLEET, REGION, write_config
from tests.mosquitto_broker import MosquittoFactory
from tests.sdk.aggregator_service.harness import Observer, ServiceThread, TierKeys

pytestmark = pytest.mark.mosquitto

PEERS = ("eu-peer-a", "eu-peer-b")


def test_agent_fomo_rounds_combine_served_peers_and_send_deltas_against_the_served_model(
        mosquitto: MosquittoFactory, fleet_keys, sections, digits, tmp_path: Path) -> None:
    x, y = digits
    np.savez(tmp_path / "val.npz", x=x[1500:1700], y=y[1500:1700])
    broker = mosquitto.start()
    cfg = sections(broker.port)
    cfg["data"]["validation_path"] = tmp_path / "val.npz"
    cfg["training"].update(fomo_candidates=2, fomo_timeout_s=5.0)
    cfg["submit"]["receipt_timeout_s"] = 5.0
    (tmp_path / "agent").mkdir(exist_ok=True)
    agent = open_agent(load_config(write_config(tmp_path / "agent" / "agent.toml", cfg)))
    manifest = agent.trainer.manifest
    peer_keys = {peer: Ed25519PrivateKey.generate() for peer in PEERS}
    root = TierKeys()
    config = RegionalConfig(
        fleet=FLEET, region=REGION, encryption_key=fleet_keys.aggregator, signing_key=fleet_keys.region,
        spec=manifest.shared_spec(), bundle_version=manifest.bundle_version,
        policy=RoundPolicy(quorum=3, deadline_s=60.0),
        device_keys={DEVICE: fleet_keys.device.public_key(), **{p: k.public_key() for p, k in peer_keys.items()}},
        root_verify_key=root.signing.public_key(), root_encryption_key=root.encryption.public_key(), fomo_candidates=2,
    )
    settings = BrokerSettings(host="127.0.0.1", port=broker.port, client_id="eu-agg", max_packet_size=256 * 1024)

    def build() -> tuple[RegionalService, RegionalAggregator]:
        aggregator = RegionalAggregator.open(tmp_path / "eu.sqlite", config, rng=np.random.default_rng(0))
        return RegionalService(aggregator, region=REGION, layout=agent.config.topics, broker=settings,
                               loop=LoopSettings(tick_s=0.05)), aggregator

    thread = ServiceThread(build, max_seconds=120.0).start()
    observer = Observer(broker.port, client_id="observer").subscribe(f"{agent.config.topics.base}/dev/+/down/receipt")
    rng = np.random.default_rng(3)
    try:
        agent.start()
        start = agent.trainer.global_reference
        for number in (0, 1):
            global_params = {n: (v + 0.01 * number).astype(np.float32) for n, v in start.items()}
            observer.publish(agent.config.topics.root_model, sign_model(
                ModelHeader.create(fleet=FLEET, sender="root", round=number, bundle_version=manifest.bundle_version),
                global_params, signer_key=root.signing), retain=True)
            for peer, key in peer_keys.items():  # the peers upload first, so the pool holds them
                delta = {n: (0.05 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in start.items()}
                header = UpdateHeader.create(fleet=FLEET, sender=peer, region=REGION, round=number,
                                             bundle_version=manifest.bundle_version, sample_count=100)
                observer.publish(agent.config.topics.device_update(peer), seal_update(
                    header, delta, recipient_public_key=fleet_keys.aggregator.public_key(), sender_key=key))
            observer.receive(lambda t: t.endswith("/down/receipt"), count=2)

            result = agent.run(max_rounds=1)

            assert [(r.round, r.status) for r in result.rounds] == [(number, RoundStatus.ACCEPTED)]
            answer = agent.intake.candidates
            assert answer is not None and answer.header.round == number and sorted(answer.header.peers) == list(PEERS)
            # The served model S_r (regional_weight 0: G_r) is the delta reference; the pool's copy of this
            # device, S_r + delta, is exactly the model it trained, so the delta was taken against S_r.
            for n, v in global_params.items():
                np.testing.assert_array_equal(agent.trainer.global_reference[n], v)
            assert thread.service is not None
            held = thread.service.aggregator.candidates.get(DEVICE)  # type: ignore[attr-defined]
            assert held is not None and held.round == number
            for n, v in agent.trainer.get_shared().items():
                np.testing.assert_allclose(held.params[n], v, atol=1e-6, rtol=0)
        assert set(agent.fomo.affinity.scores) <= set(PEERS)  # type: ignore[union-attr]
        assert sum(agent.intake.ignored.values()) == 0
    finally:
        agent.close()
        observer.close()
        thread.stop()
    assert thread.status is not None and thread.status.counters.get("candidates_served") == 2
