"""The tiers' policies on real Mosquitto: the root moves on at its deadline with nothing, and counts a device once.

- Every region's aggregate lost: the root still closes each round at its
  deadline (G_{r+1} = G_r, ``regions_missing`` counted); the federation never stalls.
- One device in two regions (re-provisioned into ``us`` with the same id and
  key, its old registration in ``eu`` left behind): both regions accept it,
  the root accepts ``eu``'s aggregate and refuses ``us``'s with a signed
  ``device_overlap`` receipt that reaches ``us`` over the bridge; the device is
  counted once and the round closes at the root's deadline.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from device_agent.protocol.envelope import open_model
from device_agent.protocol.receipts import ReceiptStatus, open_receipt
from sdk.aggregator import AggregatorStore, RootAggregator, RootConfig, RoundPolicy
from sdk.aggregator.mqtt_service import RootService
from sdk.aggregator.service_config import BrokerSettings, LoopSettings
from sdk.broker_config import generate_topology
from sdk.broker_config.passwords import hash_password
from sdk.broker_config.topology import parse_topology
from sdk.demo.brokers import free_port
from tests.mosquitto_broker import MOSQUITTO_USER, MosquittoFactory
from tests.sdk.aggregator_service.conftest import Started
from tests.sdk.aggregator_service.harness import (
    BUNDLE_VERSION,
    FLEET,
    LAYOUT,
    SPEC,
    Device,
    Observer,
    ServiceThread,
    TierKeys,
    random_params,
)
from tests.sdk.aggregator_service.test_regional_service import regional_thread
from tests.sdk.aggregator_service.test_two_tier_round import account
from tests.sdk.broker_config.test_broker_integration import Fleet, Probe, topology_toml, wait_bridges_up

#: A receipt or model that needs a region's round, a bridge hop and the root's answer: under a loaded CI
#: machine that has taken longer than a probe's 5 s (the root's own deadline here is 10 s).
ROUND_WAIT = 30.0

pytestmark = pytest.mark.mosquitto


def _root_thread(*, port: int | None = None, fleet: Fleet | None = None, keys: TierKeys, regions: dict[str, TierKeys],
                 initial: dict[str, np.ndarray], store: Path, deadline_s: float) -> ServiceThread:
    config = RootConfig(
        fleet=FLEET, encryption_key=keys.encryption, signing_key=keys.signing, spec=SPEC, bundle_version=BUNDLE_VERSION,
        policy=RoundPolicy(quorum=len(regions), deadline_s=deadline_s, min_updates=0),
        region_keys={name: k.signing.public_key() for name, k in regions.items()},
    )
    if fleet is not None:
        broker = account(fleet, "root-agg", share_group="root")
    else:
        assert port is not None
        broker = BrokerSettings(host="127.0.0.1", port=port, client_id="root-svc", share_group="root")

    def build() -> tuple[RootService, RootAggregator]:
        aggregator = RootAggregator.open(store, config)
        return RootService(aggregator, layout=LAYOUT, broker=broker, loop=LoopSettings(tick_s=0.05),
                           initial_params=initial), aggregator

    return ServiceThread(build)


def test_root_moves_on_at_its_deadline_when_every_aggregate_is_lost(mosquitto: MosquittoFactory, started: Started,
                                                                      tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    broker = mosquitto.start()
    keys, regions = TierKeys(), {"eu": TierKeys(), "us": TierKeys()}
    initial = random_params(rng)
    watcher = started.observer(Observer(broker.port, client_id="watcher")).subscribe(LAYOUT.root_model)
    root = started.thread(_root_thread(port=broker.port, keys=keys, regions=regions, initial=initial,
                                       store=tmp_path / "root.sqlite", deadline_s=0.5))
    rounds = {}
    while 2 not in rounds:  # no region ever reports: rounds 1 and 2 come from the deadline alone
        _, blob = watcher.receive(lambda t: t == LAYOUT.root_model)[0]
        model = open_model(blob, trusted_signers=keys.signing.public_key())
        rounds[model.header.round] = model.tensors
    for r in (1, 2):
        for name, value in initial.items():
            np.testing.assert_array_equal(rounds[r][name], value)  # nothing arrived: G_{r+1} = G_r
    root.stop()
    assert root.status is not None and root.status.counters["regions_missing"] >= 4  # eu and us, rounds 0 and 1


def _overlap_fleet(factory: MosquittoFactory, moved: str, into: str) -> Fleet:
    """The generated two-region fleet, plus ``moved`` (an ``eu`` device) also given an account on ``into``'s broker
    with the same password: an operator re-provisioned it without removing its old registration."""
    ports = {name: (free_port(), free_port()) for name in ("root", "eu", "us")}
    owner = MOSQUITTO_USER if os.geteuid() == 0 else None
    generated = generate_topology(parse_topology(topology_toml(ports)), factory.workspace() / "fleet", owner=owner)
    fleet = Fleet(generated=generated, brokers={})
    password = fleet.credentials(moved)["password"]
    passwords = generated.broker(into).config_file.parent / "passwords"
    with passwords.open("a") as out:
        out.write(f"{moved}:{hash_password(password)}\n")
    fleet.brokers.update({name: factory.start(config_file=generated.broker(name).config_file) for name in ("root", "eu", "us")})
    return fleet


def test_root_counts_a_device_in_two_regions_once_and_refuses_the_second_aggregate(
        mosquitto: MosquittoFactory, started: Started, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    moved = "eu-dev-0001"
    fleet = _overlap_fleet(mosquitto, moved, "us")
    probes: list[Probe] = []
    try:
        wait_bridges_up(fleet, probes)
        root_keys, region_keys = TierKeys(), {"eu": TierKeys(), "us": TierKeys()}
        ids = {"eu": ("eu-dev-0001", "eu-dev-0002"), "us": ("us-dev-0001", "us-dev-0002")}
        devices = {d: Device(device_id=d, region=r, samples=int(rng.integers(5, 50)), delta=random_params(rng, 0.1))
                   for r, members in ids.items() for d in members}
        members = {"eu": [devices[d] for d in ids["eu"]], "us": [devices[d] for d in (*ids["us"], moved)]}
        for name in ("eu", "us"):
            started.thread(regional_thread(region=name, keys=region_keys[name], root=root_keys, devices=members[name],
                                           store=tmp_path / f"{name}.sqlite", quorum=len(members[name]),
                                           broker=account(fleet, f"{name}-agg", share_group=f"{name}-aggregators")))
        sniffers = {name: fleet.client(user) for name, user in (("root", "root-agg"), ("eu", "eu-agg"), ("us", "us-agg"))}
        probes += sniffers.values()
        sniffers["root"].subscribe(LAYOUT.root_model)
        sniffers["us"].subscribe(LAYOUT.region_receipt("us"))
        sniffers["eu"].subscribe(LAYOUT.region_receipt("eu"))
        initial = random_params(rng)
        started.thread(_root_thread(fleet=fleet, keys=root_keys, regions=region_keys, initial=initial,
                                    store=tmp_path / "root.sqlite", deadline_s=10.0))
        creds = fleet.credentials(moved)
        # The moved device on its old region first: eu's aggregate reaches the root before us's.
        for device in members["eu"]:
            client = fleet.client(device.device_id)
            probes.append(client)
            client.publish(LAYOUT.device_update(device.device_id), device.seal(device.header(0), region_keys["eu"].encryption))
        _, blob, _ = sniffers["eu"].receive(timeout=ROUND_WAIT)
        assert open_receipt(blob, trusted_signers=root_keys.signing.public_key()).status is ReceiptStatus.ACCEPTED
        # ... then on its new one, with the same id and key, alongside us's own devices.
        on_us = Probe.connect(moved, creds["password"], port=fleet.brokers["us"].ports[0])
        probes.append(on_us)
        for device in members["us"]:
            client = on_us if device.device_id == moved else fleet.client(device.device_id)
            probes.append(client)
            sealed = Device(device_id=device.device_id, region="us", samples=device.samples, delta=device.delta, key=device.key)
            client.publish(LAYOUT.device_update(device.device_id), sealed.seal(sealed.header(0), region_keys["us"].encryption))
        _, blob, _ = sniffers["us"].receive(timeout=ROUND_WAIT)
        refused = open_receipt(blob, trusted_signers=root_keys.signing.public_key())
        assert (refused.device, refused.round, refused.status, refused.reason) == ("us", 0, ReceiptStatus.REJECTED,
                                                                                     "device_overlap")
        # The root's round closes at its deadline with eu alone: the device is counted once, by eu.
        while True:
            _, blob, _ = sniffers["root"].receive(timeout=ROUND_WAIT)
            g1 = open_model(blob, trusted_signers=root_keys.signing.public_key())
            if g1.header.round == 1:
                break
        total = sum(d.samples for d in members["eu"])
        for name in SPEC:
            expected = initial[name] + sum(d.samples * d.delta[name].astype(np.float64) for d in members["eu"]) / total
            np.testing.assert_allclose(g1.tensors[name], expected, atol=1e-6, rtol=0)
    finally:
        for probe in probes:
            probe.close()
    for thread in started.threads:
        thread.stop_event.set()
    for thread in started.threads:
        thread.stop()
    started.threads.clear()
    root_store = AggregatorStore.open(tmp_path / "root.sqlite", identity=f"root:{FLEET}/root", member="check")
    us_store = AggregatorStore.open(tmp_path / "us.sqlite", identity=f"region:{FLEET}/us", member="check")
    try:
        assert [(k.sender, k.round) for k in root_store.accepted_since(0)] == [("eu", 0)]
        assert root_store.counters()["rejected:device_overlap"] >= 1 and root_store.counters()["regions_missing"] == 1
        # us heard the refusal over the bridge, stored it, and stopped resending.
        assert us_store.counters()["aggregate_rejected:device_overlap"] == 1
    finally:
        root_store.close()
        us_store.close()
