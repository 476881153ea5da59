"""``run_demo``: set the fleet up, start brokers, aggregators and devices, follow the rounds, tear everything down.

Everything is bounded: broker start-up, service start-up, every device step
(receipt timeouts) and the whole run (``DemoSettings.timeout_s``). Whatever
ends the run (success, a failure, the time limit, Ctrl-C) stops the devices,
then the aggregator services, then the brokers, and removes the work directory
unless it is kept.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from device_agent.bundle.archive import install_bundle
from device_agent.daemon.agent import RoundStatus
from device_agent.trainer import DeviceTrainer
from sdk.demo.brokers import BrokerSet, broker_owner, ensure_mosquitto, find_mosquitto
from sdk.demo.embedded import INSTALL_HINT, EmbeddedBrokerSet, amqtt_available
from sdk.demo.devices import DeviceEvaluation, DeviceEvent, DeviceFailed, DeviceRound, DeviceWorker
from sdk.demo.fleet import DemoFleet, prepare_fleet
from sdk.demo.report import DemoResult, RegionRound, RegionSummary, parameter_shift, summarise
from sdk.demo.services import ServiceThread, regional_thread, root_thread
from sdk.demo.settings import DemoError, DemoSettings

logger = logging.getLogger(__name__)

OnRound = Callable[[RegionRound], None]


def make_workdir() -> Path:
    """A fresh directory under the system temp dir that user ``mosquitto`` can traverse (0711: search, not list)."""
    path = Path(tempfile.mkdtemp(prefix="fedge-demo-"))
    if broker_owner() is not None:
        path.chmod(0o711)
    return path


def choose_backend(choice: str) -> str:
    """``"mosquitto"`` or ``"embedded"`` for a :attr:`DemoSettings.broker` choice (DemoError when it cannot run).

    ``"auto"``: Mosquitto when installed, or installable (root with apt-get); otherwise the embedded amqtt brokers.
    """
    if choice == "mosquitto":
        ensure_mosquitto()
        return "mosquitto"
    if choice == "auto":
        if find_mosquitto():
            return "mosquitto"
        if os.geteuid() == 0 and shutil.which("apt-get"):
            try:
                ensure_mosquitto()
                return "mosquitto"
            except DemoError as exc:
                logger.warning("%s; falling back to the embedded broker", exc)
    if not amqtt_available():
        raise DemoError("mosquitto is not installed and the embedded broker needs amqtt: install mosquitto "
                        f"(e.g. `sudo apt-get install -y mosquitto`) or `{INSTALL_HINT}`")
    logger.warning("using embedded amqtt brokers in this process: passwords are checked, ACLs are NOT enforced (dev mode)")
    return "embedded"


def run_demo(settings: DemoSettings, *, on_round: OnRound | None = None, keep_workdir: bool = False,
             clock: Callable[[], float] = time.monotonic) -> DemoResult:
    """Run the demo. With ``keep_workdir`` the work directory stays (``DemoResult.workdir``); otherwise it is removed.

    ``on_round`` is called in this thread each time a region finishes a round.
    Raises :class:`DemoError` when no broker backend can run, a component fails or the time limit passes.
    """
    backend = choose_backend(settings.broker)  # before minutes of set-up, fail fast
    workdir = make_workdir()
    try:
        started = clock()
        fleet = prepare_fleet(settings, workdir)
        # The root's copy of the bundle: G_0 is its initial shared weights, the spec and version its manifest's.
        bundle = install_bundle(fleet.bundle_path, fleet.fleet_public_key, fleet.workdir / "root-bundle")
        result = _run_fleet(settings, fleet, initial=DeviceTrainer(bundle).get_shared(), spec=bundle.manifest.shared_spec(),
                            bundle_version=bundle.manifest.bundle_version, on_round=on_round, clock=clock, started=started,
                            backend=backend)
    finally:
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result = dataclasses.replace(result, broker=backend)
    return dataclasses.replace(result, workdir=workdir) if keep_workdir else result


def _run_fleet(settings: DemoSettings, fleet: DemoFleet, *, initial: dict[str, np.ndarray],
               spec: dict[str, tuple[tuple[int, ...], str]], bundle_version: int, on_round: OnRound | None,
               clock: Callable[[], float], started: float, backend: str) -> DemoResult:
    (fleet.workdir / "aggregators").mkdir()
    events: queue.Queue[DeviceEvent] = queue.Queue()
    limit = settings.timeout_s
    with ExitStack() as stack:
        if backend == "embedded":
            passwords = {user: fleet.password(user) for user in fleet.generated.credential_files}
            stack.enter_context(EmbeddedBrokerSet(fleet.generated, passwords=passwords, workdir=fleet.workdir / "embedded"))
        else:
            stack.enter_context(BrokerSet(fleet.generated))
        shared = backend == "mosquitto"  # amqtt has no $share subscriptions
        services: list[ServiceThread] = []
        stack.callback(_stop_services, services)
        for region in fleet.regions:
            services.append(regional_thread(fleet, region, spec=spec, bundle_version=bundle_version,
                                            deadline_s=settings.round_deadline_s, max_seconds=limit, shared=shared))
            services[-1].start()
        services.append(root_thread(fleet, initial=initial, spec=spec, bundle_version=bundle_version,
                                    deadline_s=settings.round_deadline_s, max_seconds=limit, shared=shared))
        services[-1].start()
        workers = [DeviceWorker(device, rounds=settings.rounds, events=events) for device in fleet.devices]
        stack.callback(_stop_workers, workers)
        devices_started = clock()
        for worker in workers:
            worker.start()
        follower = _RoundFollower(fleet, start=devices_started, clock=clock, on_round=on_round)
        deadline = devices_started + limit
        while not follower.complete:
            if clock() > deadline:
                raise DemoError(f"the demo did not finish within {limit:g} s (--timeout)")
            dead = [f"{s.name} ({s.error})" for s in services if not s.alive]
            if dead:
                raise DemoError(f"aggregator service(s) stopped early: {', '.join(dead)}")
            try:
                follower.handle(events.get(timeout=0.5))
            except queue.Empty:
                pass
    return follower.result(settings, initial=initial, setup_seconds=devices_started - started)


def _stop_services(services: list[ServiceThread]) -> None:
    for service in reversed(services):  # the root last: regions may still be forwarding to it
        service.stop()


def _stop_workers(workers: list[DeviceWorker]) -> None:
    for worker in workers:
        worker.request_stop()
    for worker in workers:
        worker.join()


class _RoundFollower:
    """Collects the devices' events into per-region rounds, round times and the final evaluations."""

    def __init__(self, fleet: DemoFleet, *, start: float, clock: Callable[[], float], on_round: OnRound | None) -> None:
        self._fleet = fleet
        self._start = start
        self._clock = clock
        self._on_round = on_round
        self._members = {region: {d.device_id for d in fleet.devices_in(region)} for region in fleet.regions}
        self._pending: dict[tuple[int, str], dict[str, DeviceRound]] = {}
        self._region_rounds: list[RegionRound] = []
        self._round_end: dict[int, float] = {}
        self.evaluations: dict[str, DeviceEvaluation] = {}

    @property
    def complete(self) -> bool:
        """Whether every device has reported its evaluation."""
        return len(self.evaluations) == len(self._fleet.devices)

    def handle(self, event: DeviceEvent) -> None:
        """Take one device event (DemoError for a failed device)."""
        if isinstance(event, DeviceFailed):
            raise DemoError(f"device {event.device} failed: {event.error}")
        if isinstance(event, DeviceEvaluation):
            self.evaluations[event.device] = event
            return
        if event.status is RoundStatus.NO_RECEIPT:
            logger.warning("device %s round %d: no receipt yet; it resends", event.device, event.round)
            return
        done = self._pending.setdefault((event.round, event.region), {})
        done[event.device] = event
        if set(done) != self._members[event.region]:
            return
        losses = [d.mean_loss for d in done.values() if np.isfinite(d.mean_loss)]
        line = RegionRound(round=event.round, region=event.region,
                           statuses={device: d.status.value for device, d in sorted(done.items())},
                           mean_train_loss=float(np.mean(losses)) if losses else float("nan"),
                           elapsed_s=self._clock() - self._start)
        self._region_rounds.append(line)
        if self._on_round is not None:
            self._on_round(line)
        if all((event.round, region) in {(r.round, r.region) for r in self._region_rounds} for region in self._members):
            self._round_end[event.round] = max(d.finished_at for (rnd, _), ds in self._pending.items()
                                               if rnd == event.round for d in ds.values())

    def result(self, settings: DemoSettings, *, initial: dict[str, np.ndarray], setup_seconds: float) -> DemoResult:
        """The :class:`DemoResult` once :attr:`complete`."""
        evaluations = [self.evaluations[d.device_id] for d in self._fleet.devices]
        ends = [self._round_end[r] for r in sorted(self._round_end)]
        round_seconds = tuple(float(b - a) for a, b in zip([self._start, *ends[:-1]], ends))

        def summary(name: str, evs: list[DeviceEvaluation]) -> RegionSummary:
            return summarise(name, [e.personal_accuracy for e in evs], [e.global_accuracy for e in evs],
                             [e.test_examples for e in evs])

        final = evaluations[0]
        return DemoResult(
            settings=settings,
            rounds=tuple(sorted(self._region_rounds, key=lambda r: (r.round, r.region))),
            round_seconds=round_seconds,
            regions=tuple(summary(region, [e for e in evaluations if e.region == region]) for region in self._members),
            overall=summary("all", evaluations),
            global_shift=parameter_shift(initial, final.final_global),
            final_round=final.model_round,
            setup_seconds=setup_seconds,
        )

