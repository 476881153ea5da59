"""RegionalService on one real Mosquitto broker: receipts, rejections, the sealed aggregate for the root."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.protocol.chunking import frames_for_publish
from device_agent.protocol.envelope import open_model, open_update, sign_model
from device_agent.protocol.headers import ModelHeader
from device_agent.protocol.receipts import ReceiptStatus, open_receipt
from sdk.aggregator import RegionalAggregator, RegionalConfig, RoundPolicy
from sdk.aggregator.mqtt_service import RegionalService
from sdk.aggregator.downlink import DownlinkSettings
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
    weighted_mean,
)

pytestmark = pytest.mark.mosquitto


def regional_thread(*, region: str, keys: TierKeys, root: TierKeys, devices: list[Device], store: Path, quorum: int,
                    broker: BrokerSettings, downlink: DownlinkSettings | None = None) -> ServiceThread:
    """A RegionalService thread for ``region`` (regional_weight 0, deadline far away; ``downlink``: model deltas)."""
    config = RegionalConfig(
        fleet=FLEET, region=region, encryption_key=keys.encryption, signing_key=keys.signing, spec=SPEC,
        bundle_version=BUNDLE_VERSION, policy=RoundPolicy(quorum=quorum, deadline_s=60.0),
        device_keys={d.device_id: d.key.public_key() for d in devices},
        root_verify_key=root.signing.public_key(), root_encryption_key=root.encryption.public_key(),
        influence=LOOSE_BOUNDS,
    )

    def build() -> tuple[RegionalService, RegionalAggregator]:
        aggregator = RegionalAggregator.open(store, config)
        service = RegionalService(aggregator, region=region, layout=LAYOUT, broker=broker, loop=LoopSettings(tick_s=0.05),
                                  downlink=downlink)
        return service, aggregator

    return ServiceThread(build)


def test_regional_service_receipts_rejections_and_aggregate(mosquitto: MosquittoFactory, started: Started, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    broker = mosquitto.start()
    region, root = TierKeys(), TierKeys()
    devices = [Device(device_id=f"eu-dev-{i}", region="eu", samples=n, delta=random_params(rng, 0.1))
               for i, n in enumerate((10, 30, 60))]
    observer = started.observer(Observer(broker.port, client_id="observer")).subscribe(
        f"{LAYOUT.base}/dev/+/down/receipt", LAYOUT.global_model, LAYOUT.region_aggregate("eu"))
    settings = BrokerSettings(host="127.0.0.1", port=broker.port, client_id="eu-agg-1", share_group="eu-aggregators",
                              max_packet_size=65536)
    started.thread(regional_thread(region="eu", keys=region, root=root, devices=devices, store=tmp_path / "eu.sqlite",
                                   quorum=3, broker=settings))

    # The root's model G_0 (as the bridge would deliver it) starts the round; the region republishes it signed.
    initial = random_params(rng)
    g0 = sign_model(ModelHeader.create(fleet=FLEET, sender="root", round=0, bundle_version=BUNDLE_VERSION),
                    initial, signer_key=root.signing)
    observer.publish(LAYOUT.root_model, g0, retain=True)
    [(_, served)] = observer.receive(lambda t: t == LAYOUT.global_model)
    model = open_model(served, trusted_signers=region.signing.public_key())
    assert model.header.round == 0 and model.header.region == "eu"
    for name in SPEC:
        np.testing.assert_array_equal(model.tensors[name], initial[name])

    first = devices[0].header(0)
    observer.publish(LAYOUT.device_update("eu-dev-0"), b"garbage, not a sealed update")
    observer.publish(LAYOUT.device_update("eu-dev-0"), devices[0].seal(first, region.encryption))
    # Same nonce, other content: a replay, rejected with a receipt.
    observer.publish(LAYOUT.device_update("eu-dev-0"), devices[0].seal(first, region.encryption, random_params(rng)))
    observer.publish(LAYOUT.device_update("eu-dev-1"), devices[1].seal(devices[1].header(0), region.encryption))
    # The last device's update goes out in chunk frames: the service reassembles them.
    topic = LAYOUT.device_update("eu-dev-2")
    frames = frames_for_publish(devices[2].seal(devices[2].header(0), region.encryption), broker_limit=400, topic=topic)
    assert len(frames) > 1
    for frame in frames:
        observer.publish(topic, frame)

    receipts = [open_receipt(blob, trusted_signers=region.signing.public_key())
                for _, blob in observer.receive(lambda t: t.endswith("/down/receipt"), count=4)]
    # The inbox serves senders round-robin, so only each device's own receipts keep their order.
    by_device: dict[str, list[tuple[ReceiptStatus, str]]] = {}
    for r in receipts:
        by_device.setdefault(r.device, []).append((r.status, r.reason))
    assert by_device == {
        "eu-dev-0": [(ReceiptStatus.ACCEPTED, ""), (ReceiptStatus.REJECTED, "replay")],
        "eu-dev-1": [(ReceiptStatus.ACCEPTED, "")],
        "eu-dev-2": [(ReceiptStatus.ACCEPTED, "")],
    }

    [(_, sealed)] = observer.receive(lambda t: t == LAYOUT.region_aggregate("eu"))
    aggregate = open_update(sealed, recipient_key=root.encryption, sender_public_key={"eu": region.signing.public_key()})
    assert aggregate.header.round == 0 and aggregate.header.sample_count == 100
    expected = weighted_mean([d.delta for d in devices], [d.samples for d in devices])
    for name in SPEC:
        np.testing.assert_allclose(aggregate.tensors[name], expected[name], atol=1e-6, rtol=0)

    thread = started.threads[0]
    thread.stop()
    assert thread.status is not None and thread.report is not None
    assert thread.status.rejections() == {"malformed": 1, "replay": 1}
    assert thread.status.accepted == 3
    assert thread.report.counters == {}

    # A restarted service on the same store resends the stored aggregate (the same bytes: a duplicate at the root).
    late = started.observer(Observer(broker.port, client_id="observer-2")).subscribe(LAYOUT.region_aggregate("eu"))
    started.thread(regional_thread(region="eu", keys=region, root=root, devices=devices, store=tmp_path / "eu.sqlite",
                                   quorum=3, broker=settings))
    [(_, resent)] = late.receive(lambda t: t == LAYOUT.region_aggregate("eu"))
    assert resent == sealed
