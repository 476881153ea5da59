"""The emulated Raspberry Pi as one device of a real federation, for two rounds.

The demo's fleet (:func:`sdk.demo.fleet.prepare_fleet`: watch 1D-CNN FedAlt
bundle, generated Mosquitto topology with ACLs and passwords, root + two
bridged regional brokers on loopback, root and regional aggregator services)
with four devices: three x86_64 :class:`DeviceWorker` threads and one device
on the emulated Pi. The Pi gets its provisioning directory (agent.toml from the
overlay's template, keys, bundle) through ``fedge-device-setup provision``, its
local data through the sensor adapter (its training windows replayed as a
sample stream), and runs ``fedge-agent run --config /etc/fedge/agent.toml``
as user ``fedge`` with the unit's environment, exactly as the unit's
ExecStart does (plus ``--rounds 2``). The aggregators must have accepted its
update in both rounds and the agent must have verified both signed receipts.
The aggregators open only frame version 2 (prehashed) and announce it, so the
Pi must negotiate and seal it.
"""

from __future__ import annotations

import json
import queue
import shutil
import time
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle.archive import install_bundle
from device_agent.daemon.agent import RoundStatus
from device_agent.trainer import DeviceTrainer
from sdk.demo import DemoSettings
from sdk.demo.brokers import BrokerSet
from sdk.demo.devices import DeviceEvent, DeviceFailed, DeviceRound, DeviceWorker
from sdk.demo.fleet import FLEET, MESSAGE_SIZE_LIMIT, DemoDevice, DemoFleet, prepare_fleet
from sdk.demo.run import make_workdir
from sdk.demo.services import ServiceThread, regional_thread, root_thread
from tests.device_agent.daemon.fleet_harness import render_toml
from tests.field.arm64_root import EmulatedPi
from tests.field.conftest import Timings
from tests.integration.test_federation_end_to_end import _accepted_rows

pytestmark = [pytest.mark.aarch64, pytest.mark.mosquitto, pytest.mark.timeout(1800)]

ROUNDS = 2
#: Every aggregator opens only frame version 2 and announces it: the Pi's updates are accepted only if it seals the
#: prehashed frame on aarch64 (a version-1 update would be refused as malformed, with no receipt).
PREHASHED_ONLY = frozenset({2})
SETTINGS = DemoSettings(devices=4, rounds=ROUNDS, epochs=1, round_deadline_s=240.0, timeout_s=600.0)
#: Bound on the federated part (brokers up to the Pi's exit); the Pi trains under emulation (50-75x slower).
RUN_LIMIT_S = 420.0
PROVISION = "/tmp/fedge-provisioning"
STREAM = "/tmp/imu-stream.csv"
#: The unit's ExecStart and Environment= (examples/firmware-image/rootfs/fedge-agent.service).
UNIT_ARGV = ["/opt/fedge/venv/bin/fedge-agent", "run", "--config", "/etc/fedge/agent.toml"]
UNIT_ENV = {"ORT_DISABLE_TELEMETRY": "1"}


@dataclass(frozen=True, kw_only=True)
class PiRun:
    """What the federation left: the Pi agent's JSON result and stderr, the x86 devices' rounds, the stores' accepted rows."""

    device: DemoDevice
    fleet: DemoFleet
    result: dict[str, object]
    stderr: str
    seconds: float
    x86_rounds: list[DeviceRound]
    accepted: dict[str, list[tuple[str, int]]]
    #: the windows the sensor adapter wrote on the Pi, and the device's training split they were replayed from
    local_data: dict[str, np.ndarray]
    train: dict[str, np.ndarray]


def provisioning_dir(fleet: DemoFleet, device: DemoDevice, template: bytes, out: Path) -> Path:
    """agent.toml (the overlay's /etc/fedge/agent.toml.example, filled in) + keys/ + bundles/ for ``device``."""
    config = tomllib.loads(template.decode())
    config["device"].update(id=device.device_id, fleet=FLEET, region=device.region)
    config["broker"] = {"host": "127.0.0.1", "port": fleet.port(device.region), "max_packet_size": MESSAGE_SIZE_LIMIT,
                        "password_file": "keys/mqtt-password", "keepalive_s": 30, "connect_timeout_s": 10.0}
    config["bundle"]["path"] = "bundles/watch-cnn.fedge"
    config["training"].update(threads=1, seed=0)
    config["submit"] = {"receipt_timeout_s": 20.0, "max_attempts": 5}
    config["backoff"] = {"initial_s": 0.5, "max_s": 5.0}
    keys = out / "keys"
    (out / "bundles").mkdir(parents=True)
    keys.mkdir()
    (out / "agent.toml").write_text(render_toml(config))
    cfg = device.config
    shutil.copy(fleet.bundle_path, out / "bundles" / "watch-cnn.fedge")
    for name, source in {"fleet.pub": cfg.fleet_public_key, "device.key": cfg.device_private_key,
                         "aggregator.x25519.pub": cfg.aggregator_public_key, "root.pub": cfg.model_signers[0],
                         "region.pub": cfg.receipt_signers[0]}.items():
        shutil.copy(source, keys / name)
    (keys / "mqtt-password").write_text(fleet.password(device.device_id) + "\n")
    return out


def sample_stream(train: np.ndarray, labels: np.ndarray) -> str:
    """The device's training windows (n, 6, 100) as the sensor's sample lines, window after window."""
    lines = []
    for window, label in zip(train, labels):
        for sample in window.T:
            lines.append(f"{int(label)}," + ",".join(repr(float(v)) for v in sample))
    return "\n".join(lines) + "\n"


def _stop_all(services: list[ServiceThread], workers: list[DeviceWorker]) -> None:
    for worker in workers:
        worker.request_stop()
    for worker in workers:
        worker.join()
    for service in reversed(services):
        service.stop()


def run_federation_with_pi(pi: EmulatedPi, overlay_template: bytes, timings: Timings) -> PiRun:
    workdir = make_workdir()
    try:
        fleet = prepare_fleet(SETTINGS, workdir)
        device = fleet.devices[0]
        others = fleet.devices[1:]
        # provisioning, as a Pi would receive it, installed by the overlay's own setup tool
        staged = provisioning_dir(fleet, device, overlay_template, pi.path(PROVISION))
        staged.chmod(0o700)
        setup = pi.run(["/opt/fedge/sbin/fedge-device-setup", "provision", PROVISION], timeout=300)
        assert setup.returncode == 0, setup.stderr
        # local data through the sensor adapter, under emulation, as user fedge
        with np.load(device.config.data.path) as train:
            x, y = train["x"], train["y"]
        pi.path(STREAM).write_text(sample_stream(x, y))
        pi.path(STREAM).chmod(0o644)
        started = time.monotonic()
        adapter = pi.run(["/opt/fedge/bin/fedge-sensor-windows", "--input", STREAM, "--out", "/var/lib/fedge/data/local.npz",
                          "--channels", "6", "--window", "100", "--stride", "100", "--keep", "100000"], user="fedge", timeout=600)
        timings.add("sensor_adapter", time.monotonic() - started)
        assert adapter.returncode == 0, adapter.stderr
        with np.load(pi.path("/var/lib/fedge/data/local.npz")) as written:
            local = {"x": written["x"], "y": written["y"]}

        bundle = install_bundle(fleet.bundle_path, fleet.fleet_public_key, workdir / "root-bundle")
        initial = DeviceTrainer(bundle).get_shared()
        spec, version = bundle.manifest.shared_spec(), bundle.manifest.bundle_version
        (workdir / "aggregators").mkdir()
        events: queue.Queue[DeviceEvent] = queue.Queue()
        with ExitStack() as stack:
            stack.enter_context(BrokerSet(fleet.generated))
            services: list[ServiceThread] = []
            workers: list[DeviceWorker] = []
            stack.callback(_stop_all, services, workers)
            for region in fleet.regions:
                services.append(regional_thread(fleet, region, spec=spec, bundle_version=version, frames=PREHASHED_ONLY,
                                                deadline_s=SETTINGS.round_deadline_s, max_seconds=RUN_LIMIT_S))
                services[-1].start()
            services.append(root_thread(fleet, initial=initial, spec=spec, bundle_version=version, frames=PREHASHED_ONLY,
                                        deadline_s=SETTINGS.round_deadline_s, max_seconds=RUN_LIMIT_S))
            services[-1].start()
            started = time.monotonic()
            agent = pi.start([*UNIT_ARGV, "--rounds", str(ROUNDS)], user="fedge", env=UNIT_ENV,
                             stdout_path=workdir / "pi.out", stderr_path=workdir / "pi.err")
            workers += [DeviceWorker(d, rounds=ROUNDS, events=events) for d in others]
            for worker in workers:
                worker.start()
            x86_rounds: list[DeviceRound] = []
            deadline = started + RUN_LIMIT_S
            while agent.poll() is None:
                assert time.monotonic() < deadline, f"the emulated Pi did not finish {ROUNDS} rounds in {RUN_LIMIT_S:g} s:\n" \
                                                    f"{(workdir / 'pi.err').read_text()[-3000:]}"
                dead = [f"{s.name}: {s.error}" for s in services if not s.alive]
                assert not dead, f"aggregator service(s) stopped early: {dead}"
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                assert not isinstance(event, DeviceFailed), f"device {event.device} failed: {event.error}"
                if isinstance(event, DeviceRound):
                    x86_rounds.append(event)
            seconds = time.monotonic() - started
            timings.add("federation_pi_run", seconds)
            finished_by = time.monotonic() + 60
            while len(x86_rounds) < ROUNDS * len(others) and time.monotonic() < finished_by:
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                assert not isinstance(event, DeviceFailed), f"device {event.device} failed: {event.error}"
                if isinstance(event, DeviceRound):
                    x86_rounds.append(event)
        stdout, stderr = (workdir / "pi.out").read_text(), (workdir / "pi.err").read_text()
        assert agent.returncode == 0, f"the Pi agent exited {agent.returncode}:\n{stderr[-3000:]}"
        return PiRun(device=device, fleet=fleet, result=json.loads(stdout.strip().splitlines()[-1]), stderr=stderr,
                     seconds=seconds, x86_rounds=x86_rounds, accepted=_accepted_rows(fleet), local_data=local,
                     train={"x": x, "y": y})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def pi_run(emulated_pi: EmulatedPi, overlay, field_timings: Timings) -> Iterator[PiRun]:
    import tarfile

    with tarfile.open(overlay.tar) as tar:
        member = tar.extractfile("etc/fedge/agent.toml.example")
        assert member is not None
        template = member.read()
    yield run_federation_with_pi(emulated_pi, template, field_timings)


def test_emulated_pi_finishes_two_rounds_accepted_by_signed_receipt(pi_run: PiRun) -> None:
    result = pi_run.result
    assert result["device"] == pi_run.device.device_id and result["backend"] == "portable"
    assert [(r["round"], r["status"], r["trained"]) for r in result["rounds"]] == [(0, "accepted", True), (1, "accepted", True)]
    assert result["finished"] == ROUNDS and result["stopped"] is False


def test_emulated_pi_updates_were_counted_once_per_round_by_its_region_and_the_root(pi_run: PiRun) -> None:
    region = pi_run.device.region
    for r in range(ROUNDS):
        assert [s for s, rnd in pi_run.accepted[region] if rnd == r].count(pi_run.device.device_id) == 1
        assert sorted(s for s, rnd in pi_run.accepted["root"] if rnd == r) == sorted(pi_run.fleet.regions)
    finished = {(e.device, e.round): e.status for e in pi_run.x86_rounds}
    others = [d.device_id for d in pi_run.fleet.devices[1:]]
    assert finished == {(d, r): RoundStatus.ACCEPTED for d in others for r in range(ROUNDS)}


def test_emulated_pi_sensor_adapter_rebuilt_exactly_its_training_windows(pi_run: PiRun) -> None:
    """Replayed as a sample stream and cut again (window 100, stride 100), the windows come back bit for bit."""
    assert pi_run.local_data["x"].shape == pi_run.train["x"].shape == (pi_run.device.train_examples, 6, 100)
    np.testing.assert_array_equal(pi_run.local_data["x"], pi_run.train["x"])
    np.testing.assert_array_equal(pi_run.local_data["y"], pi_run.train["y"])


def test_emulated_pi_agent_left_no_telemetry_identity(pi_run: PiRun, emulated_pi: EmulatedPi) -> None:
    """onnxruntime >= 1.29 keeps a telemetry device id under ~/.cache unless ORT_DISABLE_TELEMETRY is set: the unit sets it."""
    assert not list(emulated_pi.path("/var/lib/fedge").rglob("deviceid*"))
