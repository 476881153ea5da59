"""Models down as compressed deltas over a real Mosquitto: a real RegionalService (deltas on, a round-by-round
uplink override) and two real agents (real ORT training). Devices that applied every delta hold the
publisher's reconstruction bit for bit; a device that was away for two rounds and restarted takes the
full model and rejoins the deltas; what each device downloads is measured on the wire."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.compression import CompressionSpec
from device_agent.daemon.agent import RoundStatus
from device_agent.daemon.bootstrap import open_agent
from device_agent.daemon.config import load_config
from device_agent.keys import save_private_key
from device_agent.protocol.envelope import claimed_update_header, sign_model
from device_agent.protocol.headers import ModelHeader
from device_agent.protocol.model_delta import open_model_delta
from sdk.aggregator import RegionalAggregator, RegionalConfig, RoundPolicy
from sdk.aggregator.downlink import DownlinkSettings, UplinkSchedule
from sdk.aggregator.mqtt_service import RegionalService
from sdk.aggregator.service_config import BrokerSettings, LoopSettings
from tests.device_agent.daemon.fleet_harness import DEVICE, FLEET, REGION, write_config
from tests.mosquitto_broker import MosquittoFactory
from tests.sdk.aggregator_service.harness import Observer, ServiceThread, TierKeys

pytestmark = pytest.mark.mosquitto

OTHER = "eu-dev-0002"
DOWN = "q4"
UPLINK = "0:q8,2:topk:0.3+q8"


def test_agents_follow_compressed_model_deltas_and_a_restarted_one_falls_back_and_rejoins(
        mosquitto: MosquittoFactory, fleet_keys, sections, tmp_path: Path) -> None:
    broker = mosquitto.start()
    configs = {}
    other_key = Ed25519PrivateKey.generate()
    save_private_key(other_key, fleet_keys.directory / "other.key")
    for device in (DEVICE, OTHER):
        cfg = sections(broker.port)
        work = tmp_path / device
        work.mkdir()
        cfg["device"]["id"] = device
        cfg["bundle"]["install_dir"] = work / "bundle"
        cfg["state"]["dir"] = work / "state"
        cfg["submit"]["receipt_timeout_s"] = 5.0
        if device == OTHER:
            cfg["keys"]["device_private_key"] = fleet_keys.directory / "other.key"
        configs[device] = write_config(work / "agent.toml", cfg)
    agents = {device: open_agent(load_config(path)) for device, path in configs.items()}
    manifest = agents[DEVICE].trainer.manifest
    topics = agents[DEVICE].config.topics
    root = TierKeys()
    config = RegionalConfig(
        fleet=FLEET, region=REGION, encryption_key=fleet_keys.aggregator, signing_key=fleet_keys.region,
        spec=manifest.shared_spec(), bundle_version=manifest.bundle_version,
        policy=RoundPolicy(quorum=10, deadline_s=600.0),  # the test moves the rounds on (the root's next model)
        device_keys={DEVICE: fleet_keys.device.public_key(), OTHER: other_key.public_key()},
        root_verify_key=root.signing.public_key(), root_encryption_key=root.encryption.public_key(),
    )
    settings = BrokerSettings(host="127.0.0.1", port=broker.port, client_id="eu-agg", max_packet_size=256 * 1024)
    downlink = DownlinkSettings(compression=CompressionSpec.parse(DOWN), uplink=UplinkSchedule.parse(UPLINK))

    def build() -> tuple[RegionalService, RegionalAggregator]:
        aggregator = RegionalAggregator.open(tmp_path / "eu.sqlite", config, rng=np.random.default_rng(0))
        return RegionalService(aggregator, region=REGION, layout=topics, broker=settings, loop=LoopSettings(tick_s=0.05),
                               downlink=downlink), aggregator

    thread = ServiceThread(build, max_seconds=180.0).start()
    observer = Observer(broker.port, client_id="observer").subscribe(topics.global_model, topics.global_model_delta,
                                                                     topics.all_device_updates)
    rng = np.random.default_rng(5)
    true = dict(agents[DEVICE].trainer.global_reference)
    sizes: dict[int, tuple[int, int]] = {}
    encodings: dict[tuple[str, int], str] = {}

    def publisher_held():
        assert thread.service is not None and thread.service.publisher is not None
        return thread.service.publisher.held_model()

    def play(number: int, players: dict) -> None:
        nonlocal true
        true = {n: (v + 0.02 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in true.items()}
        observer.publish(topics.root_model, sign_model(
            ModelHeader.create(fleet=FLEET, sender="root", round=number, bundle_version=manifest.bundle_version),
            true, signer_key=root.signing), retain=True)
        got = dict(observer.receive(lambda t: t in (topics.global_model, topics.global_model_delta), count=2))
        delta = got[topics.global_model_delta]
        sizes[number] = (len(got[topics.global_model]), len(delta))
        if delta:
            assert open_model_delta(delta, trusted_signers=fleet_keys.region.public_key()).header.round == number
        for device, agent in players.items():
            result = agent.run(max_rounds=1)
            assert [(r.round, r.status) for r in result.rounds] == [(number, RoundStatus.ACCEPTED)], device
            # bit for bit: what the device holds and trained from is the publisher's reconstruction
            held = publisher_held()
            assert agent.intake.held.digest == held.digest and agent.intake.held.round == number
            for n, v in held.tensors.items():
                np.testing.assert_array_equal(agent.trainer.global_reference[n], v)
        for topic, blob in observer.receive(lambda t: t.endswith("/up/update"), count=len(players)):
            header = claimed_update_header(blob)
            encodings[(header.sender, header.round)] = header.encoding.value

    try:
        play(0, agents)  # the chain starts: full models
        assert all(a.intake.deltas_applied == 0 for a in agents.values())
        play(1, agents)  # deltas from here on; both leave the full model's topic
        for agent in agents.values():
            assert agent.intake.deltas_applied == 1 and topics.global_model not in agent.connection.subscriptions
        agents[OTHER].close()  # away for rounds 2 and 3
        play(2, {DEVICE: agents[DEVICE]})
        play(3, {DEVICE: agents[DEVICE]})
        back = open_agent(load_config(configs[OTHER]))  # restarted: holds nothing, takes the full model
        agents[OTHER] = back
        assert topics.global_model in back.connection.subscriptions
        play(4, agents)
        assert back.intake.deltas_applied == 0
        play(5, agents)  # and rejoins the deltas
        assert back.intake.deltas_applied == 1 and topics.global_model not in back.connection.subscriptions
        assert agents[DEVICE].intake.deltas_applied == 5
        refused = {k: v for k, v in back.intake.ignored.items() if k.startswith("delta_")}
        assert set(refused) <= {"delta_no_base"}  # a retained delta before its base arrived: one line, then the full model
        assert sum(agents[DEVICE].intake.ignored.values()) == 0
    finally:
        for agent in agents.values():
            agent.close()
        observer.close()
        thread.stop()
    # the round's uplink override: q8 for rounds 0-1, top-30% + q8 from round 2 (the bundle itself says none)
    assert manifest.compression is None
    assert {k: v for k, v in encodings.items() if k[0] == DEVICE} == {
        (DEVICE, 0): "q8", (DEVICE, 1): "q8", (DEVICE, 2): "topk_q8", (DEVICE, 3): "topk_q8", (DEVICE, 4): "topk_q8",
        (DEVICE, 5): "topk_q8"}
    assert sizes[0][1] == 0  # round 0: the chain starts, the retained delta is cleared
    full, delta = sizes[5]
    print(f"bytes down per device per round: full float32 {full}, q4 delta {delta}: {full / delta:.1f}x")
    assert delta < full / 4
