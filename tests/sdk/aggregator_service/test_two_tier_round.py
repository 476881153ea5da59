"""One full round on a generated fleet: root + two bridged regional brokers, real ACLs and passwords.

RootService bootstraps G_0, the bridges carry it to both regions, each
RegionalService serves it to its devices, devices (each on its own ACL-confined
account) send sealed updates, the regions forward their aggregates over the
bridges, and the root publishes G_1 = G_0 + the sample-weighted mean of every
device's delta, which reaches the devices again as their region's round-1 model. Region us sends its
models down as q8 deltas as well: its devices (through the generated ACLs) apply the round-1 delta to
their round-0 model and hold bit for bit the full model us publishes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.compression import CompressionSpec
from device_agent.compression.downlink import HeldModel, apply_model_delta
from device_agent.protocol.envelope import open_model
from device_agent.protocol.model_delta import open_model_delta
from device_agent.protocol.receipts import ReceiptStatus, open_receipt
from sdk.aggregator import RootAggregator, RootConfig, RoundPolicy
from sdk.aggregator.downlink import DownlinkSettings
from sdk.aggregator.mqtt_service import RootService
from sdk.aggregator.service_config import BrokerSettings, LoopSettings
from tests.mosquitto_broker import MosquittoFactory
from tests.sdk.aggregator_service.conftest import Started
from tests.sdk.aggregator_service.harness import (
    BUNDLE_VERSION,
    FLEET,
    LAYOUT,
    SPEC,
    WAIT,
    Device,
    ServiceThread,
    TierKeys,
    random_params,
)
from tests.sdk.aggregator_service.test_regional_service import regional_thread
from tests.sdk.broker_config.test_broker_integration import Fleet, Probe, start_fleet, wait_bridges_up

pytestmark = pytest.mark.mosquitto

DEVICES = {"eu": ("eu-dev-0001", "eu-dev-0002"), "us": ("us-dev-0001", "us-dev-0002")}
DELTAS = DownlinkSettings(compression=CompressionSpec.parse("q8"))


def account(fleet: Fleet, username: str, *, share_group: str | None) -> BrokerSettings:
    """The plain loopback listener of ``username``'s broker, with its generated password."""
    cred = fleet.credentials(username)
    return BrokerSettings(host="127.0.0.1", port=fleet.brokers[cred["broker"]].ports[0], client_id=f"{username}-svc",
                          username=username, password=cred["password"], share_group=share_group,
                          max_packet_size=fleet.generated.topology.message_size_limit)


def root_thread(fleet: Fleet, *, keys: TierKeys, regions: dict[str, TierKeys], initial: dict[str, np.ndarray],
                store: Path) -> ServiceThread:
    config = RootConfig(
        fleet=FLEET, encryption_key=keys.encryption, signing_key=keys.signing, spec=SPEC,
        bundle_version=BUNDLE_VERSION, policy=RoundPolicy(quorum=len(regions), deadline_s=60.0, min_updates=0),
        region_keys={name: k.signing.public_key() for name, k in regions.items()},
    )
    broker = account(fleet, "root-agg", share_group="root")

    def build() -> tuple[RootService, RootAggregator]:
        aggregator = RootAggregator.open(store, config)
        service = RootService(aggregator, layout=LAYOUT, broker=broker, loop=LoopSettings(tick_s=0.05), initial_params=initial)
        return service, aggregator

    return ServiceThread(build)


def test_one_round_through_root_and_two_bridged_regions(mosquitto: MosquittoFactory, started: Started, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    fleet = start_fleet(mosquitto)
    probes: list[Probe] = []
    try:
        wait_bridges_up(fleet, probes)
        root_keys = TierKeys()
        region_keys = {name: TierKeys() for name in DEVICES}
        devices = {name: [Device(device_id=d, region=name, samples=int(rng.integers(5, 50)), delta=random_params(rng, 0.1))
                          for d in ids] for name, ids in DEVICES.items()}
        for name in DEVICES:
            thread = regional_thread(region=name, keys=region_keys[name], root=root_keys, devices=devices[name],
                                     store=tmp_path / f"{name}.sqlite", quorum=len(DEVICES[name]),
                                     broker=account(fleet, f"{name}-agg", share_group=f"{name}-aggregators"),
                                     downlink=DELTAS if name == "us" else None)
            started.thread(thread)
        # A sniffer on every broker sees every message of the fleet (what a broker operator sees).
        sniffers = [fleet.client(user) for user in ("root-agg", "eu-agg", "us-agg")]
        probes += sniffers
        for sniffer in sniffers:
            sniffer.subscribe("fedge/#")
        watcher = fleet.client("root-agg")
        probes.append(watcher)
        watcher.subscribe(LAYOUT.root_model)
        clients = {d.device_id: fleet.client(d.device_id) for ds in devices.values() for d in ds}
        probes += clients.values()
        for device_id, client in clients.items():
            client.subscribe(LAYOUT.device_receipt(device_id))
            client.subscribe(LAYOUT.global_model)

        initial = random_params(rng)
        started.thread(root_thread(fleet, keys=root_keys, regions=region_keys, initial=initial, store=tmp_path / "root.sqlite"))

        held = {}
        for name, ds in devices.items():
            verify = region_keys[name].signing.public_key()
            for device in ds:
                client = clients[device.device_id]
                _, served, _ = client.receive()
                model = open_model(served, trusted_signers=verify)
                assert (model.header.round, model.header.region) == (0, name)
                np.testing.assert_array_equal(model.tensors["base.weight"], initial["base.weight"])
                held[device.device_id] = HeldModel.of(0, model.tensors)
                client.publish(LAYOUT.device_update(device.device_id), device.seal(device.header(0), region_keys[name].encryption))
                _, blob, _ = client.receive()
                receipt = open_receipt(blob, trusted_signers=verify)
                assert (receipt.device, receipt.status) == (device.device_id, ReceiptStatus.ACCEPTED)
                if name == "us":
                    client.subscribe(LAYOUT.global_model_delta)  # round 0's was cleared: nothing retained yet

        models = {}
        while 1 not in models:
            _, blob, _ = watcher.receive(timeout=WAIT)
            opened = open_model(blob, trusted_signers=root_keys.signing.public_key())
            models[opened.header.round] = opened.tensors
        everyone = [d for ds in devices.values() for d in ds]
        total = sum(d.samples for d in everyone)
        for name in SPEC:
            expected = initial[name] + sum(d.samples * d.delta[name].astype(np.float64) for d in everyone) / total
            np.testing.assert_allclose(models[1][name], expected, atol=1e-6, rtol=0)

        # Round 1 reaches eu's devices as their region's model (regional_weight 0: exactly G_1), us's as a q8
        # delta (the delta first) that makes, bit for bit, the full model us publishes: G_1 within q8's error.
        for device in devices["eu"]:
            _, served, _ = clients[device.device_id].receive()
            model = open_model(served, trusted_signers=region_keys["eu"].signing.public_key())
            assert model.header.round == 1
            np.testing.assert_array_equal(model.tensors["base.bias"], models[1]["base.bias"])
        us_key = region_keys["us"].signing.public_key()
        for device in devices["us"]:
            topic, blob, _ = clients[device.device_id].receive()
            assert topic == LAYOUT.global_model_delta
            delta = open_model_delta(blob, trusted_signers=us_key)
            h = delta.header
            applied = apply_model_delta(held[device.device_id], delta.tensors, round=h.round, base_round=h.base_round,
                                        base_digest=h.base_digest, digest=h.digest)
            assert applied.model is not None and applied.model.round == 1, applied.detail
            topic, served, _ = clients[device.device_id].receive()
            full = open_model(served, trusted_signers=us_key)
            assert topic == LAYOUT.global_model and full.header.round == 1
            for name, value in full.tensors.items():
                np.testing.assert_array_equal(applied.model.tensors[name], value)
                np.testing.assert_allclose(value, models[1][name], atol=float(np.max(np.abs(models[1][name] - initial[name]))) / 100)

        # No broker ever carried a device's delta in the clear: only ciphertext crossed them.
        seen: list[tuple[str, bytes]] = []
        by_broker: dict[str, list[str]] = {}
        for broker_name, sniffer in zip(("root", "eu", "us"), sniffers):
            while not sniffer.messages.empty():
                topic, payload, _ = sniffer.messages.get_nowait()
                seen.append((topic, payload))
                by_broker.setdefault(broker_name, []).append(topic)
                if topic.endswith("/down/receipt") and LAYOUT.region_of(topic) is not None:
                    # Every tier acknowledges: the root's signed receipt for a region's aggregate, bridged in.
                    receipt = open_receipt(payload, trusted_signers=root_keys.signing.public_key())
                    assert (receipt.device, receipt.round, receipt.status) == (LAYOUT.region_of(topic), 0, ReceiptStatus.ACCEPTED)
        for name in DEVICES:
            assert LAYOUT.region_receipt(name) in by_broker[name], f"the root's receipt never reached {name}"
            others = [LAYOUT.region_receipt(o) for o in DEVICES if o != name]
            assert not set(others) & set(by_broker[name]), f"another region's receipt crossed {name}'s bridge"
        update_topics = {t for t, _ in seen if t.endswith("/up/update")}
        assert update_topics == {LAYOUT.device_update(d.device_id) for d in everyone}
        assert any(t.endswith("/up/aggregate") for t, _ in seen)
        for device in everyone:
            for name, value in device.delta.items():
                raw = np.ascontiguousarray(value, dtype=np.float32).tobytes()
                for topic, payload in seen:
                    assert raw[:16] not in payload, f"{device.device_id}'s {name} delta visible on {topic}"

    finally:
        for probe in probes:
            probe.close()
