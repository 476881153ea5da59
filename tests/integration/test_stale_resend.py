"""A real device agent whose receipt was lost, answered ``stale_round`` on its resend: it moves on, never loops.

docs/protocol.md, "Rounds, resends and replays". The region (a real
``RegionalService`` on real Mosquitto) counts the device's round-0 update but
its receipt is lost, as with an aggregator killed between the commit and the
receipt (here: the service drops that one receipt, deterministically). The
region closes round 0 and the root's G_1 starts round 1 before the device's
receipt timeout. The device resends the same bytes and hears ``stale_round``:
it records round 0 as ``stale``, takes round 1's model, trains and is accepted.
The region's store holds its round-0 update exactly once.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from contextlib import ExitStack

import pytest

from device_agent.bundle.archive import install_bundle
from device_agent.daemon.agent import RoundStatus
from device_agent.daemon.bootstrap import open_agent
from device_agent.protocol.envelope import sign_model
from device_agent.protocol.headers import ModelHeader
from device_agent.trainer import DeviceTrainer
from sdk.aggregator import RegionalAggregator, RegionalConfig, RoundPolicy
from sdk.aggregator.mqtt_service import RegionalService
from sdk.aggregator.outcomes import HandledUpdate
from sdk.aggregator.service_config import BrokerSettings, LoopSettings
from sdk.aggregator.store import AggregatorStore
from sdk.demo import DemoSettings
from sdk.demo.brokers import LOOPBACK, BrokerSet
from sdk.demo.fleet import FLEET, MESSAGE_SIZE_LIMIT, aggregator_account, prepare_fleet
from sdk.demo.run import make_workdir
from sdk.demo.services import LAYOUT

pytestmark = pytest.mark.mosquitto

REGION = "left"


class ReceiptLosingService(RegionalService):
    """The real service, except that the first receipt it owes ``device`` is never published (as if it crashed
    right after the commit); ``counted`` is set once that update is committed."""

    def __init__(self, *args: object, device: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.device = device
        self.counted = threading.Event()

    def send_receipt(self, device: str, handled: HandledUpdate, *, arrived: float | None) -> None:
        if device == self.device and handled.accepted and not self.counted.is_set():
            self.counted.set()  # committed; the receipt dies here
            return
        super().send_receipt(device, handled, arrived=arrived)


def test_device_answered_stale_round_after_a_lost_receipt_moves_on_to_the_next_round() -> None:
    workdir = make_workdir()
    try:
        fleet = prepare_fleet(DemoSettings(devices=2, rounds=2, epochs=1), workdir)
        device = fleet.devices_in(REGION)[0]
        config = dataclasses.replace(device.config, receipt_timeout_s=3.0, max_attempts=3)
        bundle = install_bundle(fleet.bundle_path, fleet.fleet_public_key, workdir / "root-bundle")
        initial = DeviceTrainer(bundle).get_shared()
        keys = fleet.region_keys[REGION]
        region_config = RegionalConfig(
            fleet=FLEET, region=REGION, encryption_key=keys.encryption, signing_key=keys.signing,
            spec=bundle.manifest.shared_spec(), bundle_version=bundle.manifest.bundle_version,
            policy=RoundPolicy(quorum=1, deadline_s=60.0), device_keys={device.device_id: device.public_key},
            root_verify_key=fleet.root_keys.signing.public_key(), root_encryption_key=fleet.root_keys.encryption.public_key())
        account = aggregator_account(REGION)
        broker = BrokerSettings(host=LOOPBACK, port=fleet.port(REGION), client_id=f"{account}-svc", username=account,
                                password=fleet.password(account), max_packet_size=MESSAGE_SIZE_LIMIT)
        store = workdir / "left.sqlite"

        def root_model(round_number: int) -> bytes:
            header = ModelHeader.create(fleet=FLEET, sender="root", round=round_number,
                                        bundle_version=bundle.manifest.bundle_version)
            return sign_model(header, initial, signer_key=fleet.root_keys.signing)

        with ExitStack() as stack:
            stack.enter_context(BrokerSet(fleet.generated))
            stop = threading.Event()
            services: list[ReceiptLosingService] = []

            def serve() -> None:
                with RegionalAggregator.open(store, region_config) as aggregator:
                    services.append(ReceiptLosingService(aggregator, region=REGION, layout=LAYOUT, broker=broker,
                                                         loop=LoopSettings(tick_s=0.05), device=device.device_id))
                    services[0].run(stop, max_seconds=60)

            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            stack.callback(thread.join, 10)
            stack.callback(stop.set)
            deadline = time.monotonic() + 15
            while not (services and services[0].subscribed.is_set()):
                assert time.monotonic() < deadline and thread.is_alive(), "the regional service did not start"
                time.sleep(0.05)
            service = services[0]
            service.publish(LAYOUT.root_model, root_model(0), retain=True)  # this test plays the root

            agent = stack.enter_context(open_agent(config))
            results = []
            model = agent.wait_for_model(20.0)
            assert model is not None and model.header.round == 0

            def start_round_1() -> None:  # once the lost-receipt update is counted: the region closes, the root moves on
                if service.counted.wait(30):
                    time.sleep(0.2)
                    service.publish(LAYOUT.root_model, root_model(1), retain=True)
            threading.Thread(target=start_round_1, daemon=True).start()
            results.append(agent.complete_round(model))
            model = agent.wait_for_model(20.0)
            assert model is not None and model.header.round == 1, "the device did not move on to round 1"
            results.append(agent.complete_round(model))

        assert [(r.round, r.status, r.reason) for r in results] == [
            (0, RoundStatus.STALE, "stale_round"), (1, RoundStatus.ACCEPTED, "")]
        assert results[0].trained and results[1].receipt is not None
        assert agent.progress.completed_round == 1 and agent.state.load_pending() is None
        check = AggregatorStore.open(store, identity=f"region:{FLEET}/{REGION}", member="check")
        try:
            rows = [(row.sender, row.round) for row in check.accepted_since(0)]
            counters = check.counters()
        finally:
            check.close()
        assert rows == [(device.device_id, 0), (device.device_id, 1)]  # round 0 counted once, despite the resend
        assert counters["rejected:stale_round"] >= 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
