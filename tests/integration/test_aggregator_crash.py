"""A regional aggregator process SIGKILLed in the middle of a round, restarted on the same SQLite store.

The demo's fleet (root + two bridged regions, 5 real :class:`DeviceAgent` workers
each, 3 rounds) as in ``test_federation_end_to_end``, except that region
``left`` is served by ``fedge aggregator regional --config regional.toml`` in
its own process. When the first accepted round-1 receipt of ``left`` shows up on
the left broker (sniffed on ``fedge/#``), that process is SIGKILLed, and a new
one is started on the same store file. One ``left`` device takes up round 1 only
after the restart, so the crash always lands between the first and the last of
the region's round-1 updates. Devices whose update was lost while nothing was
subscribed (or whose receipt never went out) resend the identical sealed blob
after their receipt timeout; an update the store committed before the crash
must be answered as a replay, never counted again.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from device_agent.bundle.archive import install_bundle
from device_agent.daemon.agent import DeviceAgent, RoundStatus
from device_agent.protocol.envelope import OpenedModel
from device_agent.protocol.receipts import ReceiptStatus, open_receipt
from device_agent.trainer import DeviceTrainer
from sdk.aggregator.store import AggregatorStore
from sdk.demo import DemoSettings
from sdk.demo.brokers import BrokerSet
from sdk.demo.devices import DeviceEvaluation, DeviceEvent, DeviceFailed, DeviceWorker
from sdk.demo.fleet import FLEET, DemoFleet, prepare_fleet
from sdk.demo.run import make_workdir
from sdk.demo.services import LAYOUT, ServiceThread
from tests.integration.processes import ServiceProcess, write_regional_config
from tests.integration.test_federation_end_to_end import (
    ROUNDS,
    Capture,
    Sniffer,
    assert_aggregates_count_each_device_once,
    assert_global_models_follow_the_deltas,
    opened_device_updates,
    root_models,
    start_services,
)

pytestmark = pytest.mark.mosquitto

CRASHED = "left"
SETTINGS = DemoSettings(devices=10, rounds=ROUNDS, epochs=1, round_deadline_s=30.0, timeout_s=50.0)
#: Bound on the federated part (brokers up to every device's final evaluation); devices resend after 10 s.
RUN_LIMIT_S = 150.0  # a bound for a hang, not a speed target: CI machines run 2-3x slower than a dev machine


def _regional_process(config: Path, log: Path) -> ServiceProcess:
    return ServiceProcess("regional", config, log, max_seconds=RUN_LIMIT_S + 20)


class HeldWorker(DeviceWorker):
    """A device that takes up round 1 only once ``release`` is set (bounded): the region cannot finish that round early."""

    def __init__(self, *args: Any, release: threading.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    def _next_model(self, agent: DeviceAgent) -> OpenedModel:
        model = super()._next_model(agent)
        if model.header.round == 1:
            self._release.wait(RUN_LIMIT_S)
        return model


def _accepted(fleet: DemoFleet, region: str) -> list[tuple[str, int]]:
    """(sender, round) of every accepted row of ``region``'s store (opened as a second member)."""
    store = AggregatorStore.open(fleet.workdir / "aggregators" / f"{region}.sqlite",
                                 identity=f"region:{FLEET}/{region}", member="check")
    try:
        return [(row.sender, row.round) for row in store.accepted_since(0)]
    finally:
        store.close()


def test_regional_aggregator_sigkilled_mid_round_resumes_from_its_store_without_double_counting() -> None:
    started = time.monotonic()
    workdir = make_workdir()
    try:
        fleet = prepare_fleet(SETTINGS, workdir)
        assert CRASHED in fleet.regions and len(fleet.devices_in(CRASHED)) >= 4
        bundle = install_bundle(fleet.bundle_path, fleet.fleet_public_key, workdir / "root-bundle")
        initial = DeviceTrainer(bundle).get_shared()
        spec, version = bundle.manifest.shared_spec(), bundle.manifest.bundle_version
        capture = Capture(fleet=fleet, initial=initial)
        (workdir / "aggregators").mkdir()
        config = write_regional_config(fleet, CRASHED, workdir / "crashed-service", deadline_s=SETTINGS.round_deadline_s)
        region_verify = fleet.region_keys[CRASHED].signing.public_key()
        members = {r: sorted(d.device_id for d in fleet.devices_in(r)) for r in fleet.regions}
        samples = {d.device_id: d.train_examples for d in fleet.devices}
        processes: list[ServiceProcess] = []
        accepted_at_crash: list[tuple[str, int]] = []
        release = threading.Event()  # lets the held device take up round 1 (set after the restart, or at teardown)
        with ExitStack() as stack:
            stack.enter_context(BrokerSet(fleet.generated))
            sniffers = {name: Sniffer(fleet, name) for name in ("root", *fleet.regions)}
            for sniffer in sniffers.values():
                stack.callback(sniffer.close)

            def stop_processes() -> None:
                for process in processes:
                    process.stop()
            stack.callback(stop_processes)
            processes.append(_regional_process(config, workdir / "crashed-service" / "first.log"))
            processes[0].wait_connected()
            services: list[ServiceThread] = []
            workers: list[DeviceWorker] = []

            def stop_threads() -> None:
                release.set()
                for worker in workers:
                    worker.request_stop()
                for worker in workers:
                    worker.join()
                for service in reversed(services):
                    service.stop()
            stack.callback(stop_threads)
            start_services(fleet, services, spec=spec, bundle_version=version, initial=initial, skip_regions=(CRASHED,))
            events: queue.Queue[DeviceEvent] = queue.Queue()
            # One device of the crashed region takes up round 1 only after the restart, so the crash is mid-round.
            held = fleet.devices_in(CRASHED)[-1].device_id
            workers += [HeldWorker(device, rounds=ROUNDS, events=events, release=release) if device.device_id == held
                        else DeviceWorker(device, rounds=ROUNDS, events=events) for device in fleet.devices]
            for worker in workers:
                worker.start()

            crashed = False
            evaluated: set[str] = set()
            deadline = time.monotonic() + RUN_LIMIT_S
            while len(evaluated) < len(fleet.devices):
                assert time.monotonic() < deadline, f"only {sorted(evaluated)} finished within {RUN_LIMIT_S:g} s:\n" + \
                    "\n".join(p.text()[-2000:] for p in processes)
                dead = [f"{s.name}: {s.error}" for s in services if not s.alive]
                assert not dead, f"aggregator service(s) stopped early: {dead}"
                assert processes[-1].proc.poll() is None, f"regional process exited:\n{processes[-1].text()[-3000:]}"
                if not crashed:
                    # Watch the crashed region's broker for its first accepted round-1 receipt, then kill at once.
                    fresh = sniffers[CRASHED].drain()
                    capture.sniffed += fresh
                    for _, topic, payload in fresh:
                        device = LAYOUT.device_of(topic)
                        if device is None or topic != LAYOUT.device_receipt(device):
                            continue
                        receipt = open_receipt(payload, trusted_signers=[region_verify])
                        if receipt.round == 1 and receipt.status is ReceiptStatus.ACCEPTED:
                            processes[0].sigkill()
                            crashed = True
                            break
                    if crashed:
                        accepted_at_crash = _accepted(fleet, CRASHED)
                        processes.append(_regional_process(config, workdir / "crashed-service" / "second.log"))
                        processes[-1].wait_connected()
                        release.set()
                try:
                    event = events.get(timeout=0.02 if not crashed else 0.5)
                except queue.Empty:
                    continue
                assert not isinstance(event, DeviceFailed), f"device {event.device} failed: {event.error}"
                if isinstance(event, DeviceEvaluation):
                    evaluated.add(event.device)
                    continue
                capture.rounds.append(event)
            assert crashed, "the regional process was never killed"
            time.sleep(0.5)  # the last root model is already out (devices evaluated on it); let QoS-1 copies land
            for sniffer in sniffers.values():
                capture.sniffed += sniffer.drain()
            stack.close()  # devices, services, the restarted process (SIGTERM), sniffers, brokers
        second_log = processes[1].text()
        accepted = {CRASHED: _accepted(fleet, CRASHED)}

        # The crash hit round 1 in progress: some (not all) of the region's round-1 updates were committed.
        committed = sorted(s for s, r in accepted_at_crash if r == 1)
        assert 1 <= len(committed) < len(members[CRASHED]) and held not in committed, committed
        assert sorted(s for s, r in accepted_at_crash if r == 0) == members[CRASHED]
        # Every device finished every round, accepted or (a resend of a committed update) duplicate.
        finished = {(e.device, e.round): e.status for e in capture.rounds if e.status is not RoundStatus.NO_RECEIPT}
        assert set(finished) == {(d, r) for d in samples for r in range(ROUNDS)}
        refused = [(e.device, e.round, e.status.value, e.reason) for e in capture.rounds
                   if e.status not in (RoundStatus.ACCEPTED, RoundStatus.DUPLICATE, RoundStatus.STALE, RoundStatus.NO_RECEIPT)]
        # A committed update whose receipt died with the process is acknowledged again while its round is current, and
        # answered stale_round once the region moved on (docs/protocol.md); never rejected for any other reason.
        assert refused == [], f"refused: {refused}; committed at the crash: {committed}"
        stale = sorted((e.device, e.round) for e in capture.rounds if e.status is RoundStatus.STALE)
        assert all(d in committed and r == 1 for d, r in stale), (stale, committed)
        # The region's store holds each device exactly once per round, across both processes.
        for r in range(ROUNDS):
            assert sorted(s for s, rnd in accepted[CRASHED] if rnd == r) == members[CRASHED], (r, accepted[CRASHED])
        assert len(accepted[CRASHED]) == len(members[CRASHED]) * ROUNDS
        # What each region forwarded counts each of its devices once (the crashed round included).
        updates = opened_device_updates(capture)
        assert_aggregates_count_each_device_once(capture, updates)
        assert "forwarded round 1" in second_log, second_log[-3000:]
        # G_{r+1} == G_r + the bounded weighted mean of every device's (sniffed, opened) delta of round r.
        assert set(updates) == {(d, r) for d in samples for r in range(ROUNDS)}
        for (device, _), (header, _) in updates.items():
            assert header.sample_count == samples[device]
        assert sorted(root_models(capture)) == list(range(ROUNDS + 1))
        assert_global_models_follow_the_deltas(capture, updates)
        print(f"committed before the crash: {committed}; not accepted: {refused} + "
              f"{sorted((d, r) for (d, r), s in finished.items() if s is RoundStatus.DUPLICATE)} duplicate; "
              f"{time.monotonic() - started:.1f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
