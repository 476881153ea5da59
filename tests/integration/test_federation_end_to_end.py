"""The whole federation end to end: the demo's fleet (root + two bridged regions, 5 device agents each), 3 rounds.

The fleet is the demo's own (:func:`sdk.demo.fleet.prepare_fleet`, its broker
processes, aggregator service threads and :class:`DeviceWorker` threads); the
test adds a ``fedge/#`` sniffer on every broker, logged in with that broker's
aggregator account, which sees what a broker operator sees. From the sealed
updates it captured, opened with the regions' X25519 keys, the test recomputes
every global model in numpy and checks the root published exactly that.
"""

from __future__ import annotations

import queue
import shutil
import time
from collections.abc import Callable, Collection
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from device_agent.bundle.archive import install_bundle
from device_agent.daemon.agent import DeviceAgent, RoundStatus
from device_agent.daemon.agent_state import SealedUpdate
from device_agent.protocol.envelope import OpenedModel, open_model, open_update
from device_agent.protocol.headers import UpdateHeader
from device_agent.trainer import DeviceTrainer
from sdk.aggregator.contributors import split_contributors
from sdk.aggregator.store import AggregatorStore
from sdk.demo import DemoSettings
from sdk.demo.brokers import BrokerProcess, BrokerSet
from sdk.demo.devices import DeviceEvaluation, DeviceEvent, DeviceFailed, DeviceRound, DeviceWorker
from sdk.demo.fleet import FLEET, ROOT_ACCOUNT, DemoFleet, aggregator_account, prepare_fleet
from sdk.demo.run import make_workdir
from sdk.demo.services import LAYOUT, ServiceThread, regional_thread, root_thread
from tests.integration.reference import Update, default_bounds, global_steps, region_weight
from tests.sdk.broker_config.test_broker_integration import Probe

pytestmark = pytest.mark.mosquitto

ROUNDS = 3
SETTINGS = DemoSettings(devices=10, rounds=ROUNDS, epochs=1, round_deadline_s=30.0, timeout_s=50.0)
#: Bound on the federated part of one run (brokers up to every device's final evaluation).
RUN_LIMIT_S = 150.0  # a bound for a hang, not a speed target: CI machines run 2-3x slower than a dev machine
TOLERANCE = 1e-5

#: Called with each finished device round and the brokers and sniffers by name; True once it injected its fault.
Fault = Callable[[DeviceRound, dict[str, BrokerProcess], dict[str, "Sniffer"]], bool]


@dataclass
class Capture:
    """What one run left behind: every device's events, every sniffed message, the stores' round totals."""

    fleet: DemoFleet
    initial: dict[str, np.ndarray]
    rounds: list[DeviceRound] = field(default_factory=list)
    #: (broker, topic, payload) of every message a sniffer saw, in arrival order per broker.
    sniffed: list[tuple[str, str, bytes]] = field(default_factory=list)
    #: store name ("root" or a region) -> [(sender, round)] of every accepted row, read after the services stopped.
    accepted: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    #: service name -> how many times it connected to its broker.
    connects: dict[str, int] = field(default_factory=dict)
    #: devices of the restarted region that had finished the fault's round when the broker was killed.
    finished_before_fault: frozenset[str] = frozenset()
    #: (device, round) -> the sealed update the device published (every attempt sends these bytes).
    published: dict[tuple[str, int], bytes] = field(default_factory=dict)


class RecordingWorker(DeviceWorker):
    """A demo device that also records the sealed update it publishes each round.

    A sniffer that reconnects after a broker restart can miss a resend made
    before it subscribed; the crash test takes those from here, and only those.
    """

    def __init__(self, *args: Any, published: dict[tuple[str, int], bytes], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._published = published
        self._spying = False

    def _next_model(self, agent: DeviceAgent) -> OpenedModel:
        if not self._spying:
            submit = agent.submit

            def recorded_submit(sealed: SealedUpdate):  # the agent's own submit, after noting the bytes
                key = (sealed.header.sender, sealed.header.round)
                assert self._published.setdefault(key, sealed.blob) == sealed.blob, f"{key}: two different updates"
                return submit(sealed)

            agent.submit = recorded_submit  # type: ignore[method-assign]
            self._spying = True
        return super()._next_model(agent)


class Sniffer:
    """A ``fedge/#`` subscriber on one broker that reconnects (and resubscribes) when asked."""

    def __init__(self, fleet: DemoFleet, broker: str) -> None:
        self.broker = broker
        self._username = ROOT_ACCOUNT if broker == "root" else aggregator_account(broker)
        self._password = fleet.password(self._username)
        self._port = fleet.port(broker)
        self._probes: list[Probe] = []
        self.connect()

    def connect(self) -> None:
        probe = Probe.connect(self._username, self._password, port=self._port)
        self._probes.append(probe)
        probe.subscribe("fedge/#")

    def drain(self) -> list[tuple[str, str, bytes]]:
        """Every message received so far (by any connection), in arrival order per connection."""
        seen = []
        for probe in self._probes:
            while not probe.messages.empty():
                topic, payload, _ = probe.messages.get_nowait()
                seen.append((self.broker, topic, payload))
        return seen

    def close(self) -> None:
        for probe in self._probes:
            probe.close()


def run_federation(*, restart: Fault | None = None, frames: frozenset[int] | None = None) -> Capture:
    """Run the demo's fleet for ``ROUNDS`` rounds with sniffers on every broker; tear everything down whatever happens.

    ``frames``: the frame versions every aggregator opens and announces (None: the defaults: both opened, none announced).
    ``restart(event, brokers, sniffers)`` is called in this thread for each
    finished device round until it returns True (it may restart a broker).
    """
    workdir = make_workdir()
    try:
        fleet = prepare_fleet(SETTINGS, workdir)
        bundle = install_bundle(fleet.bundle_path, fleet.fleet_public_key, workdir / "root-bundle")
        initial = DeviceTrainer(bundle).get_shared()
        spec, version = bundle.manifest.shared_spec(), bundle.manifest.bundle_version
        capture = Capture(fleet=fleet, initial=initial)
        (workdir / "aggregators").mkdir()
        with ExitStack() as stack:
            brokers = stack.enter_context(BrokerSet(fleet.generated))
            sniffers: dict[str, Sniffer] = {}
            for name in ("root", *fleet.regions):
                sniffers[name] = Sniffer(fleet, name)
                stack.callback(sniffers[name].close)
            services: list[ServiceThread] = []
            stack.callback(_stop_all, services, [])
            start_services(fleet, services, spec=spec, bundle_version=version, initial=initial, frames=frames)
            events: queue.Queue[DeviceEvent] = queue.Queue()
            workers = [RecordingWorker(device, rounds=ROUNDS, events=events, published=capture.published)
                       for device in fleet.devices]
            stack.callback(_stop_all, [], workers)
            for worker in workers:
                worker.start()
            by_name = {b.name: b for b in brokers.brokers}
            restarted = restart is None
            evaluated: set[str] = set()
            deadline = time.monotonic() + RUN_LIMIT_S
            while len(evaluated) < len(fleet.devices):
                assert time.monotonic() < deadline, f"only {sorted(evaluated)} finished within {RUN_LIMIT_S:g} s"
                dead = [f"{s.name}: {s.error}" for s in services if not s.alive]
                assert not dead, f"aggregator service(s) stopped early: {dead}"
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                assert not isinstance(event, DeviceFailed), f"device {event.device} failed: {event.error}"
                if isinstance(event, DeviceEvaluation):
                    evaluated.add(event.device)
                    continue
                capture.rounds.append(event)
                if not restarted and restart is not None:
                    restarted = restart(event, by_name, sniffers)
                    if restarted:
                        capture.finished_before_fault = frozenset(
                            e.device for e in capture.rounds if (e.region, e.round) == (event.region, event.round)
                            and e.status is not RoundStatus.NO_RECEIPT)
            assert restarted, "the fault was never injected"
            time.sleep(0.5)  # the last root model is already out (devices evaluated on it); let QoS-1 copies land
            for sniffer in sniffers.values():
                capture.sniffed += sniffer.drain()
        capture.accepted = _accepted_rows(fleet)
        capture.connects = {s.name: s.report.connects for s in services if s.report is not None}
        return capture
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def start_services(fleet, services: list, *, spec, bundle_version: int, initial, skip_regions: tuple[str, ...] = (),
                   frames: frozenset[int] | None = None) -> None:
    """Start a regional service thread per region (except ``skip_regions``) and the root's, appending them to ``services``."""
    for region in fleet.regions:
        if region not in skip_regions:
            services.append(regional_thread(fleet, region, spec=spec, bundle_version=bundle_version,
                                            deadline_s=SETTINGS.round_deadline_s, max_seconds=RUN_LIMIT_S, frames=frames))
            services[-1].start()
    services.append(root_thread(fleet, initial=initial, spec=spec, bundle_version=bundle_version,
                                deadline_s=SETTINGS.round_deadline_s, max_seconds=RUN_LIMIT_S, frames=frames))
    services[-1].start()


def _stop_all(services: list[ServiceThread], workers: list[DeviceWorker]) -> None:
    for worker in workers:
        worker.request_stop()
    for worker in workers:
        worker.join()
    for service in reversed(services):
        service.stop()


def _accepted_rows(fleet: DemoFleet) -> dict[str, list[tuple[str, int]]]:
    """(sender, round) of every accepted row of every aggregator's store, opened as a second member once they stopped."""
    identities = {"root": f"root:{FLEET}/root", **{r: f"region:{FLEET}/{r}" for r in fleet.regions}}
    rows: dict[str, list[tuple[str, int]]] = {}
    for name, identity in identities.items():
        store = AggregatorStore.open(fleet.workdir / "aggregators" / f"{name}.sqlite", identity=identity, member="check")
        try:
            rows[name] = [(row.sender, row.round) for row in store.accepted_since(0)]
        finally:
            store.close()
    return rows


def opened_device_updates(capture: Capture, *, unsniffed: Collection[tuple[str, int]] = ()
                          ) -> dict[tuple[str, int], tuple[UpdateHeader, dict[str, np.ndarray]]]:
    """(device, round) -> the header and delta it sent, opened from the regional brokers' traffic with the region key.

    A resend must carry the very same delta (the agent persists its pending update).
    ``unsniffed``: (device, round) pairs a restarted broker's sniffer may have
    missed; those missing from the traffic are taken from what the device
    recorded publishing (:class:`RecordingWorker`); every other one must be sniffed.
    """
    fleet = capture.fleet
    device_keys = {d.device_id: d.public_key for d in fleet.devices}
    opened: dict[tuple[str, int], tuple[UpdateHeader, dict[str, np.ndarray]]] = {}

    def add(broker: str, device: str, payload: bytes) -> None:
        update = open_update(payload, recipient_key=fleet.region_keys[broker].encryption, sender_public_key=device_keys)
        assert (update.header.sender, update.header.region) == (device, broker)
        key = (device, update.header.round)
        if key in opened:
            for name, value in opened[key][1].items():
                np.testing.assert_array_equal(update.tensors[name], value)
        opened[key] = (update.header, update.tensors)

    for broker, topic, payload in capture.sniffed:
        device = LAYOUT.device_of(topic)
        if broker != "root" and device is not None and topic == LAYOUT.device_update(device):
            add(broker, device, payload)
    regions = {d.device_id: d.region for d in fleet.devices}
    for device, r in sorted(set(unsniffed) - set(opened)):
        add(regions[device], device, capture.published[(device, r)])
    return opened


def root_models(capture: Capture) -> dict[int, dict[str, np.ndarray]]:
    """round -> the global model the root published (as sniffed on the root broker), each copy identical."""
    verify = capture.fleet.root_keys.signing.public_key()
    models: dict[int, dict[str, np.ndarray]] = {}
    for broker, topic, payload in capture.sniffed:
        if broker != "root" or topic != LAYOUT.root_model:
            continue
        model = open_model(payload, trusted_signers=verify)
        assert model.header.region is None
        previous = models.setdefault(model.header.round, model.tensors)
        for name, value in previous.items():
            np.testing.assert_array_equal(model.tensors[name], value)
    return models


def updates_by_region(updates: dict[tuple[str, int], tuple[UpdateHeader, dict[str, np.ndarray]]]
                      ) -> dict[str, dict[int, list[Update]]]:
    """region -> round -> [(sample_count, delta)] of the devices' (sniffed, opened) updates, in device order."""
    grouped: dict[str, dict[int, list[Update]]] = {}
    for (_, rnd), (header, delta) in sorted(updates.items()):
        grouped.setdefault(header.region, {}).setdefault(rnd, []).append((header.sample_count, delta))
    return grouped


def assert_global_models_follow_the_deltas(capture: Capture,
                                           updates: dict[tuple[str, int], tuple[UpdateHeader, dict[str, np.ndarray]]]) -> None:
    """G_{r+1} == G_r + the bounded weighted mean (default policy, tests/integration/reference.py) of the devices'
    updates of round r, every region's bounds following its own history, for every round."""
    models = root_models(capture)
    assert sorted(models) == list(range(ROUNDS + 1)), sorted(models)
    for name, value in capture.initial.items():
        np.testing.assert_array_equal(models[0][name], value)
    steps = global_steps(updates_by_region(updates), ROUNDS)
    for r in range(ROUNDS):
        for name, g_r in models[r].items():
            np.testing.assert_allclose(models[r + 1][name], g_r.astype(np.float64) + steps[r][name], atol=TOLERANCE, rtol=0,
                                       err_msg=f"G_{r + 1}[{name}]")


def assert_aggregates_count_each_device_once(capture: Capture,
                                             updates: dict[tuple[str, int], tuple[UpdateHeader, dict[str, np.ndarray]]]) -> None:
    """Each region forwarded every round, reporting the bounded weights of all its devices, each device once."""
    fleet = capture.fleet
    aggregates = sniffed_aggregates(capture)
    assert set(aggregates) == {(region, r) for region in fleet.regions for r in range(ROUNDS)}
    grouped = updates_by_region(updates)
    for region, history in grouped.items():
        bounds = default_bounds(history, ROUNDS)
        for r in range(ROUNDS):
            header, _ = aggregates[(region, r)]
            assert len(history[r]) == len(fleet.devices_in(region))
            assert header.sample_count == region_weight(history[r], bounds[r]), (region, r)


@pytest.fixture(scope="module")
def clean_run() -> Capture:
    """One fault-free run shared by the tests that only read what it captured; every aggregator opens only frame
    version 2 (prehashed) and announces it, so every device and region must negotiate it (the crash run below keeps
    the defaults: version 1)."""
    return run_federation(frames=frozenset({2}))


def test_federation_every_update_and_aggregate_travels_prehashed_once_announced(clean_run: Capture) -> None:
    sealed = [(topic, payload) for _, topic, payload in clean_run.sniffed if payload[:4] == b"FDGU"]
    kinds = {topic.rsplit("/", 1)[-1] for topic, _ in sealed}
    assert kinds == {"update", "aggregate"}, kinds  # whole frames: these updates fit one MQTT message
    assert {payload[4] for _, payload in sealed} == {2}
    models = [payload for _, topic, payload in clean_run.sniffed if payload[:4] == b"FDGM"]
    assert models and {m[4] for m in models} == {1} and all(b'"frames":[2]' in m for m in models)


def test_federation_global_models_equal_the_sample_weighted_mean_of_the_sniffed_deltas(clean_run: Capture) -> None:
    capture = clean_run
    updates = opened_device_updates(capture)
    devices = {d.device_id: d for d in capture.fleet.devices}
    assert set(updates) == {(d, r) for d in devices for r in range(ROUNDS)}
    for (device, _), (header, _) in updates.items():
        assert header.sample_count == devices[device].train_examples > 0
    assert_global_models_follow_the_deltas(capture, updates)


def test_federation_no_broker_ever_carries_a_delta_in_the_clear(clean_run: Capture) -> None:
    capture = clean_run
    updates = opened_device_updates(capture)
    assert {b for b, _, _ in capture.sniffed} == {"root", *capture.fleet.regions}
    assert any(t == LAYOUT.region_aggregate(r) for _, t, _ in capture.sniffed for r in capture.fleet.regions)
    for (device, r), (_, delta) in updates.items():
        for name, value in delta.items():
            prefix = np.ascontiguousarray(value, dtype=np.float32).tobytes()[:16]
            assert len(prefix) == 16
            for broker, topic, payload in capture.sniffed:
                assert prefix not in payload, f"{device}'s round-{r} {name} delta in the clear on {broker}:{topic}"


def test_federation_every_device_gets_an_accepted_receipt_every_round(clean_run: Capture) -> None:
    capture = clean_run
    finished = {(e.device, e.round): e.status for e in capture.rounds if e.status is not RoundStatus.NO_RECEIPT}
    assert finished == {(d.device_id, r): RoundStatus.ACCEPTED for d in capture.fleet.devices for r in range(ROUNDS)}


def sniffed_aggregates(capture: Capture) -> dict[tuple[str, int], tuple[UpdateHeader, dict[str, np.ndarray]]]:
    """(region, round) -> the aggregate the region forwarded, as the root broker carried it, opened with the root key.

    A resend must be byte-for-byte the same message (the region stores what it sealed).
    """
    fleet = capture.fleet
    region_keys = {name: keys.signing.public_key() for name, keys in fleet.region_keys.items()}
    blobs: dict[tuple[str, int], bytes] = {}
    opened: dict[tuple[str, int], tuple[UpdateHeader, dict[str, np.ndarray]]] = {}
    for broker, topic, payload in capture.sniffed:
        region = next((r for r in fleet.regions if topic == LAYOUT.region_aggregate(r)), None)
        if broker != "root" or region is None:
            continue
        update, contributors = split_contributors(
            open_update(payload, recipient_key=fleet.root_keys.encryption, sender_public_key=region_keys))
        key = (update.header.sender, update.header.round)
        assert update.header.sender == region and blobs.setdefault(key, payload) == payload, key
        assert {device for device, _ in contributors} == {d.device_id for d in fleet.devices_in(region)}, key
        opened[key] = (update.header, update.tensors)
    return opened


def kill_and_restart_left_mid_round_1(event: DeviceRound, brokers: dict[str, BrokerProcess],
                                      sniffers: dict[str, Sniffer]) -> bool:
    """When the first "left" device has its round-1 receipt, SIGKILL the left broker and start it again."""
    if (event.region, event.round, event.status) != ("left", 1, RoundStatus.ACCEPTED):
        return False
    brokers["left"].kill()
    brokers["left"].start()
    sniffers["left"].connect()
    return True


def test_federation_survives_a_regional_broker_crash_mid_round_without_double_counting() -> None:
    capture = run_federation(restart=kill_and_restart_left_mid_round_1)
    fleet = capture.fleet
    samples = {d.device_id: d.train_examples for d in fleet.devices}
    members = {r: {d.device_id for d in fleet.devices_in(r)} for r in fleet.regions}
    # The crash really hit a round in progress, and the left aggregator had to reconnect.
    assert 1 <= len(capture.finished_before_fault) < len(members["left"])
    assert capture.connects["region-left"] >= 2 and capture.connects["region-right"] == 1
    # Every device finished every round; none was refused.
    finished = {(e.device, e.round): e.status for e in capture.rounds if e.status is not RoundStatus.NO_RECEIPT}
    assert set(finished) == {(d, r) for d in samples for r in range(ROUNDS)}
    # A device whose receipt died with the broker resends; if its region has moved on meanwhile the answer is
    # stale_round (docs/protocol.md), and the store below shows the update was counted, once.
    assert set(finished.values()) <= {RoundStatus.ACCEPTED, RoundStatus.DUPLICATE, RoundStatus.STALE}, finished
    # Each region accepted each of its devices exactly once per round, the root each region once per round.
    for region, devices in members.items():
        for r in range(ROUNDS):
            accepted = sorted(s for s, rnd in capture.accepted[region] if rnd == r)
            assert accepted == sorted(devices), (region, r, accepted)
    for r in range(ROUNDS):
        assert sorted(s for s, rnd in capture.accepted["root"] if rnd == r) == sorted(fleet.regions)
    # What the regions forwarded counts every device once (bounded weights), and the root moved by exactly that.
    # The left sniffer reconnects after the restarted broker is up: a device's round-1 resend may come first.
    updates = opened_device_updates(capture, unsniffed={(device, 1) for device in members["left"]})
    assert set(updates) == {(d, r) for d in samples for r in range(ROUNDS)}
    assert_aggregates_count_each_device_once(capture, updates)
    aggregates = sniffed_aggregates(capture)
    models = root_models(capture)
    assert sorted(models) == list(range(ROUNDS + 1))
    for r in range(ROUNDS):
        sent = [(h.sample_count, mean) for (_, rnd), (h, mean) in aggregates.items() if rnd == r]
        for name, g_r in models[r].items():
            step = sum(n * mean[name].astype(np.float64) for n, mean in sent) / sum(n for n, _ in sent)
            np.testing.assert_allclose(models[r + 1][name], g_r.astype(np.float64) + step, atol=TOLERANCE, rtol=0,
                                       err_msg=f"G_{r + 1}[{name}]")
    assert_global_models_follow_the_deltas(capture, updates)
