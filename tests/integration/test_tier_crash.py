"""Every tier acknowledges: the root and a region SIGKILLed on real bridged Mosquitto, restarted on their stores.

The demo's fleet (root + two bridged regions, 5 real :class:`DeviceAgent`
workers each, 3 rounds, default bounded aggregation). The root aggregator
(``fedge aggregator root``) and region ``left`` (``fedge aggregator
regional``) run as processes; ``right`` as a service thread.

- **The root, mid-round.** As soon as the root publishes G_1 (its round 1 is
  collecting), its process is SIGKILLed. Both regions then close round 1 and
  publish their aggregates while nothing subscribes at the root: those
  messages are gone (the root's session is clean). Once both have crossed the
  bridge, a new root process starts on the same store. The regions resend
  until the root's signed receipt arrives.
- **A region, mid-forward.** The moment ``left`` publishes its round-2
  aggregate on its broker, its process is SIGKILLed and a new one started: the
  aggregate may or may not have reached the root and the root's receipt is
  lost with the process; the new process resends whatever is unanswered.

Every round must complete, the root must count each region once per round
and each region each device once per round, and every global model must equal
the numpy reference of the default bounded rule (tests/integration/reference.py).
"""

from __future__ import annotations

import queue
import shutil
import time
from contextlib import ExitStack

import pytest

from device_agent.bundle.archive import install_bundle
from device_agent.daemon.agent import RoundStatus
from device_agent.protocol.envelope import open_model, open_update
from device_agent.protocol.receipts import ReceiptStatus, open_receipt
from device_agent.trainer import DeviceTrainer
from sdk.aggregator.store import AggregatorStore
from sdk.demo import DemoSettings
from sdk.demo.brokers import BrokerSet
from sdk.demo.devices import DeviceEvaluation, DeviceEvent, DeviceFailed, DeviceWorker
from sdk.demo.fleet import FLEET, DemoFleet, prepare_fleet
from sdk.demo.run import make_workdir
from sdk.demo.services import LAYOUT, ServiceThread, regional_thread
from tests.integration.processes import ServiceProcess, write_regional_config, write_root_config
from tests.integration.test_federation_end_to_end import (
    ROUNDS,
    Capture,
    Sniffer,
    assert_aggregates_count_each_device_once,
    assert_global_models_follow_the_deltas,
    opened_device_updates,
    root_models,
)

pytestmark = pytest.mark.mosquitto

KILLED_REGION = "left"
SETTINGS = DemoSettings(devices=10, rounds=ROUNDS, epochs=1, round_deadline_s=40.0, timeout_s=90.0)
RUN_LIMIT_S = 180.0  # a bound for a hang, not a speed target: CI machines run 2-3x slower than a dev machine


def _accepted(fleet: DemoFleet, name: str) -> list[tuple[str, int]]:
    """(sender, round) of every accepted row of the store of ``name`` ("root" or a region), opened as a second member."""
    identity = f"root:{FLEET}/root" if name == "root" else f"region:{FLEET}/{name}"
    store = AggregatorStore.open(fleet.workdir / "aggregators" / f"{name}.sqlite", identity=identity, member="check")
    try:
        return [(row.sender, row.round) for row in store.accepted_since(0)]
    finally:
        store.close()


def _counters(fleet: DemoFleet, name: str) -> dict[str, int]:
    identity = f"root:{FLEET}/root" if name == "root" else f"region:{FLEET}/{name}"
    store = AggregatorStore.open(fleet.workdir / "aggregators" / f"{name}.sqlite", identity=identity, member="check")
    try:
        return store.counters()
    finally:
        store.close()


def test_root_and_region_sigkilled_mid_round_every_round_completes_each_region_counted_once() -> None:
    started = time.monotonic()
    workdir = make_workdir()
    try:
        fleet = prepare_fleet(SETTINGS, workdir)
        assert set(fleet.regions) == {"left", "right"}
        bundle = install_bundle(fleet.bundle_path, fleet.fleet_public_key, workdir / "root-bundle")
        initial = DeviceTrainer(bundle).get_shared()
        spec, version = bundle.manifest.shared_spec(), bundle.manifest.bundle_version
        capture = Capture(fleet=fleet, initial=initial)
        (workdir / "aggregators").mkdir()
        root_config = write_root_config(fleet, workdir / "root-service", deadline_s=SETTINGS.round_deadline_s)
        left_config = write_regional_config(fleet, KILLED_REGION, workdir / "left-service", deadline_s=SETTINGS.round_deadline_s)
        root_key = fleet.root_keys.signing.public_key()
        region_keys = {name: keys.signing.public_key() for name, keys in fleet.region_keys.items()}
        roots: list[ServiceProcess] = []
        lefts: list[ServiceProcess] = []

        def start(kind: str) -> ServiceProcess:
            group, config = (roots, root_config) if kind == "root" else (lefts, left_config)
            process = ServiceProcess("root" if kind == "root" else "regional", config,
                                     workdir / f"{kind}-{len(group)}.log", max_seconds=RUN_LIMIT_S + 30)
            group.append(process)
            process.wait_connected()
            return process

        with ExitStack() as stack:
            stack.enter_context(BrokerSet(fleet.generated))
            sniffers = {name: Sniffer(fleet, name) for name in ("root", *fleet.regions)}
            for sniffer in sniffers.values():
                stack.callback(sniffer.close)
            stack.callback(lambda: [p.stop() for p in roots + lefts])
            start("left")
            services: list[ServiceThread] = [regional_thread(fleet, "right", spec=spec, bundle_version=version,
                                                             deadline_s=SETTINGS.round_deadline_s, max_seconds=RUN_LIMIT_S)]
            services[0].start()
            start("root")
            events: queue.Queue[DeviceEvent] = queue.Queue()
            workers = [DeviceWorker(device, rounds=ROUNDS, events=events) for device in fleet.devices]

            def stop_threads() -> None:
                for worker in workers:
                    worker.request_stop()
                for worker in workers:
                    worker.join()
                for service in services:
                    service.stop()
            stack.callback(stop_threads)
            for worker in workers:
                worker.start()

            phase = "wait_g1"  # -> root_down -> wait_left_2 -> done
            round1_at_root: set[str] = set()
            evaluated: set[str] = set()
            deadline = time.monotonic() + RUN_LIMIT_S
            while len(evaluated) < len(fleet.devices):
                logs = "\n".join(p.text()[-1500:] for p in roots + lefts)
                assert time.monotonic() < deadline, f"only {sorted(evaluated)} finished in {RUN_LIMIT_S:g} s ({phase}):\n{logs}"
                assert services[0].alive, f"right's service stopped: {services[0].error}"
                for sniffer in sniffers.values():
                    fresh = sniffer.drain()
                    capture.sniffed += fresh
                    for broker, topic, payload in fresh:
                        if phase == "wait_g1" and broker == "root" and topic == LAYOUT.root_model:
                            if open_model(payload, trusted_signers=root_key).header.round == 1:
                                roots[-1].sigkill()  # the root is collecting round 1
                                phase = "root_down"
                        elif phase == "root_down" and broker == "root" and LAYOUT.region_of(topic) in fleet.regions \
                                and topic == LAYOUT.region_aggregate(LAYOUT.region_of(topic)):
                            header = open_update(payload, recipient_key=fleet.root_keys.encryption,
                                                 sender_public_key=region_keys).header
                            if header.round == 1:
                                round1_at_root.add(header.sender)
                        elif phase == "wait_left_2" and broker == KILLED_REGION \
                                and topic == LAYOUT.region_aggregate(KILLED_REGION):
                            header = open_update(payload, recipient_key=fleet.root_keys.encryption,
                                                 sender_public_key=region_keys).header
                            if header.round == 2:
                                lefts[-1].sigkill()  # the region closed round 2 and is forwarding it
                                start("left")
                                phase = "done"
                if phase == "root_down" and round1_at_root == set(fleet.regions):
                    time.sleep(0.5)  # both round-1 aggregates crossed to a root broker with nobody there
                    start("root")
                    phase = "wait_left_2"
                assert lefts[-1].alive() and (phase == "root_down" or roots[-1].alive()), logs
                try:
                    event = events.get(timeout=0.05)
                except queue.Empty:
                    continue
                assert not isinstance(event, DeviceFailed), f"device {event.device} failed: {event.error}"
                if isinstance(event, DeviceEvaluation):
                    evaluated.add(event.device)
                else:
                    capture.rounds.append(event)
            assert phase == "done", f"the faults were not all injected: {phase}"
            time.sleep(0.5)
            for sniffer in sniffers.values():
                capture.sniffed += sniffer.drain()
            stack.close()

        members = {r: sorted(d.device_id for d in fleet.devices_in(r)) for r in fleet.regions}
        # Every device finished every round: accepted, or a resend acknowledged or answered stale_round.
        finished = {(e.device, e.round): e.status for e in capture.rounds if e.status is not RoundStatus.NO_RECEIPT}
        assert set(finished) == {(d.device_id, r) for d in fleet.devices for r in range(ROUNDS)}
        assert set(finished.values()) <= {RoundStatus.ACCEPTED, RoundStatus.DUPLICATE, RoundStatus.STALE}, finished
        # Exactly once at both tiers, across the crashes.
        root_rows = _accepted(fleet, "root")
        assert sorted(root_rows) == sorted((region, r) for region in fleet.regions for r in range(ROUNDS)), root_rows
        for region in fleet.regions:
            rows = _accepted(fleet, region)
            for r in range(ROUNDS):
                assert sorted(s for s, rnd in rows if rnd == r) == members[region], (region, r)
        # The killed root lost both round-1 aggregates; the regions resent them until the root's receipt came.
        resent = "aggregate resent" in "".join(p.text() for p in lefts)
        assert resent, "left never resent an aggregate"
        right_counters = services[0].report.counters if services[0].report else {}
        assert right_counters.get("aggregate_resent", 0) >= 1, right_counters
        receipts = [(topic, open_receipt(payload, trusted_signers=root_key)) for broker, topic, payload in capture.sniffed
                    if broker in fleet.regions and LAYOUT.region_of(topic) == broker and topic == LAYOUT.region_receipt(broker)]
        for region in fleet.regions:
            answered = {r.round for t, r in receipts if r.device == region and r.status is ReceiptStatus.ACCEPTED}
            assert answered >= {0, 1}, (region, answered)
        assert _counters(fleet, "root").get("regions_missing", 0) == 0
        # The global models are the bounded weighted means of what the devices sent, each round.
        updates = opened_device_updates(capture)
        assert_aggregates_count_each_device_once(capture, updates)
        assert sorted(root_models(capture)) == list(range(ROUNDS + 1))
        assert_global_models_follow_the_deltas(capture, updates)
        print(f"root processes {len(roots)}, left processes {len(lefts)}; statuses "
              f"{sorted({s.value for s in finished.values()})}; {time.monotonic() - started:.1f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
