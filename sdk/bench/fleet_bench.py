"""``fedge bench fleet``: a whole fleet on one machine, through real Mosquitto, for several rounds.

One run:

1. **Provision** (not timed): build and sign the digits MLP bundle and run
   ``fedge fleet init`` on a topology of a root broker and ``regions``
   bridged regional brokers with ``devices`` devices (:mod:`sdk.bench.fleet_setup`):
   per-device keys, passwords and ACLs as in production.
2. **Start** what ``fedge fleet up`` starts (:class:`~sdk.fleet.up.FleetRunner`):
   every Mosquitto, then each region's ``fedge aggregator regional`` process;
   then ``generators`` load-generator processes (:mod:`sdk.bench.fleet_load`:
   pre-sealed real updates, one MQTT connection per device, multiplexed) and
   ``agents`` real ``fedge-agent run`` processes; a read-only observer on the
   root broker (the fleet's monitoring account); last the root's
   ``fedge aggregator root``, whose round-0 model starts the clock.
3. **Rounds** (timed): round ``r`` lasts from the root's model ``r`` to its
   model ``r + 1`` as the observer sees them. Every process is sampled from
   /proc (:mod:`sdk.bench.proc_stats`) at the start and the end of the rounds.
4. **Check**: every receipt is verified (region key, the update's nonce,
   accepted); with no agents the last global model is compared with the
   numpy reference of the sent updates under the default bounded-influence
   rules (:func:`~sdk.bench.fleet_checks.reference_model`).

:mod:`sdk.bench.fleet_report` turns the raw :class:`FleetRun` into the
summary, table, JSON and PNG.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdk.bench import proc_stats
from sdk.bench.fleet_checks import count_receipts, reference_model
from sdk.bench.fleet_metrics import port_from_log, scrape
from sdk.bench.fleet_setup import FLEET, BenchFleet, SignedBundle, provision

logger = logging.getLogger(__name__)

Progress = Callable[[str], object]


@dataclass(frozen=True, kw_only=True)
class FleetBenchConfig:
    """The size of one run. ``agents`` of the ``devices`` are real ``fedge-agent run`` processes; the rest are
    played by ``generators`` load-generator processes. ``deadline_s``: each region's round deadline (the root
    waits 1.5x); ``timeout_s``: the whole timed part, after which the run fails."""

    devices: int = 1000
    regions: int = 10
    rounds: int = 3
    agents: int = 3
    generators: int = 2
    deadline_s: float = 600.0
    receipt_timeout_s: float = 60.0
    timeout_s: float = 1800.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("devices", "regions", "rounds", "generators"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.devices < self.regions:
            raise ValueError(f"need at least one device per region: {self.devices} devices, {self.regions} regions")
        if not 0 <= self.agents <= self.devices:
            raise ValueError(f"agents must be in 0..devices, got {self.agents}")


QUICK = FleetBenchConfig(devices=20, regions=2, rounds=1, agents=1, generators=1, deadline_s=120.0, receipt_timeout_s=20.0,
                         timeout_s=300.0)


@dataclass(frozen=True, kw_only=True)
class Proc:
    """A process the run started: ``kind`` broker | regional | root | generator | agent."""

    name: str
    kind: str
    pid: int


@dataclass(frozen=True, kw_only=True)
class FleetRun:
    """The raw measurements of one run (times on the monotonic clock); ``devices``: device -> (region, index);
    ``models``: the root's global model of each round as the observer received it; ``service_metrics``: site ->
    what its aggregator's /metrics said after the last round (:mod:`sdk.bench.fleet_metrics`)."""

    config: FleetBenchConfig
    parameters: int
    bundle_version: int
    setup_s: dict[str, float]
    model_times: dict[int, float]
    processes: list[Proc]
    before: dict[str, proc_stats.ProcSample]
    after: dict[str, proc_stats.ProcSample]
    window_s: float
    machine_busy: float | None
    generator_results: list[dict[str, Any]]
    agent_results: dict[str, dict[str, Any]]
    accepted: dict[str, dict[int, int]]
    other_receipts: int
    model_max_abs_diff: float | None
    light_devices: int
    devices: dict[str, tuple[str, int]] = field(default_factory=dict)
    models: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    service_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def devices_by_region(self) -> dict[str, int]:
        """How many devices each region has."""
        counts: dict[str, int] = {}
        for region, _ in self.devices.values():
            counts[region] = counts.get(region, 0) + 1
        return counts


class _Observer:
    """The monitoring account on the root broker: records when each signed global model arrives, keeps the models."""

    def __init__(self, bench: BenchFleet) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from device_agent.keys import load_verify_key
        from device_agent.protocol.topics import TopicLayout

        credentials = json.loads(bench.monitor_credentials().read_text())
        self.topic = TopicLayout(fleet=FLEET).root_model
        self.root_key = load_verify_key(bench.signing_pub("root"))
        self.times: dict[int, float] = {}
        self.models: dict[int, dict[str, np.ndarray]] = {}
        self.changed = threading.Condition()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fleet-bench-observer", clean_session=True)
        self.client.username_pw_set(credentials["username"], credentials["password"])
        self.client.on_connect = lambda c, *_: c.subscribe(self.topic, 1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", int(credentials["port"]), keepalive=60)
        self.client.loop_start()

    def _on_message(self, _client, _userdata, msg) -> None:
        from device_agent.protocol.envelope import open_model

        now = time.monotonic()
        try:
            opened = open_model(bytes(msg.payload), trusted_signers=[self.root_key])
        except Exception:  # noqa: BLE001 - a model that does not verify is reported as missing
            logger.exception("observer: a root model did not verify")
            return
        with self.changed:
            self.times.setdefault(opened.header.round, now)
            self.models.setdefault(opened.header.round, dict(opened.tensors))
            self.changed.notify_all()

    def wait_for(self, round: int, timeout_s: float, alive: Callable[[], None]) -> bool:
        """Wait until the model of ``round`` arrived (``alive`` raises when a process died); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while round not in self.times:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(min(1.0, remaining))
                alive()
        return True

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _read_line(process: subprocess.Popen[str], timeout_s: float, what: str, log: Path) -> str:
    if process.stdout is None:
        raise RuntimeError(f"{what} was started without a pipe to read")
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    line = process.stdout.readline() if ready else ""
    if not line.strip():
        process.kill()
        raise RuntimeError(f"{what} did not get ready in {timeout_s:g} s; log {log}:\n{log.read_text(errors='replace')[-2000:]}")
    return line


def _agent_command() -> list[str]:
    found = shutil.which("fedge-agent", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-c", "import sys; from device_agent.cli import main; sys.exit(main())"]


def _start_generators(bench: BenchFleet, config: FleetBenchConfig, work: Path, ports: dict[str, int]) -> list[tuple[subprocess.Popen[str], Path, Path]]:
    light = [d for d in bench.devices if d not in bench.agents]
    groups = [light[k::config.generators] for k in range(config.generators)]
    signers = {region: [str(bench.signing_pub("root")), str(bench.signing_pub(region))] for region in bench.regions}
    started = []
    for k, group in enumerate(g for g in groups if g):
        out = work / f"generator-{k}.json"
        job = {"fleet": FLEET, "rounds": config.rounds, "seed": config.seed, "bundle_version": bench.bundle_version,
               "spec": {n: list(s) for n, s in bench.spec.items()}, "receipt_timeout_s": config.receipt_timeout_s,
               "connect_timeout_s": 120.0, "model_signers": signers, "out": str(out),
               "devices": [{"id": d, "region": bench.devices[d][0], "index": bench.devices[d][1],
                            "dir": str(bench.device_dir(d)), "port": ports[bench.devices[d][0]]} for d in group]}
        job_path = work / f"generator-{k}.job.json"
        job_path.write_text(json.dumps(job))
        log = work / f"generator-{k}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen([sys.executable, "-m", "sdk.bench.fleet_load", str(job_path)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=handle, text=True,
                                       env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))
        started.append((process, out, log))
    return started


def _start_agents(bench: BenchFleet, config: FleetBenchConfig, work: Path) -> dict[str, tuple[subprocess.Popen[str], Path]]:
    agents = {}
    for device in bench.agents:
        log = work / f"agent-{device}.log"
        with open(log, "w") as handle:
            agents[device] = (subprocess.Popen([*_agent_command(), "run", "--config", "agent.toml", "--rounds", str(config.rounds)],
                                               cwd=bench.device_dir(device), stdout=subprocess.PIPE, stderr=handle, text=True,
                                               env=dict(os.environ, OMP_NUM_THREADS="1")), log)
    deadline = time.monotonic() + 180.0
    for device, (process, log) in agents.items():
        while "MQTT connected" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent {device} did not connect; log {log}:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
    return agents


def _sample_all(processes: list[Proc]) -> dict[str, proc_stats.ProcSample]:
    return {p.name: proc_stats.sample(p.pid) for p in processes}


def run_fleet_bench(config: FleetBenchConfig, *, progress: Progress | None = None, keep: Path | None = None,
                    bundle: SignedBundle | None = None) -> FleetRun:
    """One run (module docstring); RuntimeError naming what failed. ``keep``: copy the logs there. ``bundle``: a
    signed bundle to use instead of building the digits MLP (tests reuse theirs)."""
    from sdk.fleet.day2 import open_fleet
    from sdk.fleet.up import FleetRunner

    say = progress or (lambda _message: None)
    work = Path(tempfile.mkdtemp(prefix="fedge-fleetbench-"))
    if os.geteuid() == 0:
        work.chmod(0o711)  # Mosquitto, dropped to its own user, must reach the broker files
    setup: dict[str, float] = {}
    runners: list[FleetRunner] = []
    generators: list[tuple[subprocess.Popen[str], Path, Path]] = []
    agents: dict[str, tuple[subprocess.Popen[str], Path]] = {}
    observer: _Observer | None = None
    sampler: proc_stats.LastSamples | None = None
    try:
        started = time.monotonic()
        bench = provision(work, devices=config.devices, regions=config.regions, agents=config.agents, deadline_s=config.deadline_s,
                          bundle=bundle)
        setup["provision_s"] = time.monotonic() - started
        say(f"provisioned {config.devices} devices in {config.regions} regions ({setup['provision_s']:.0f} s)")
        fleet = open_fleet(bench.directory)
        topology = fleet.spec.topology
        ports = {r.name: r.address.port for r in topology.regions}
        started = time.monotonic()
        runners.append(FleetRunner(fleet, sites=["root", *bench.regions], services=False))
        runners[-1].start()
        runners.append(FleetRunner(fleet, sites=list(bench.regions), brokers=False))
        runners[-1].start()
        setup["start_brokers_and_regions_s"] = time.monotonic() - started
        say(f"{config.regions + 1} brokers and {config.regions} regional aggregators up")
        started = time.monotonic()
        generators = _start_generators(bench, config, work, ports)
        ready = [json.loads(_read_line(p, 600.0, "load generator", log)) for p, _, log in generators]
        setup["seal_s"] = max(r["seal_s"] for r in ready)
        setup["connect_s"] = max(r["connect_s"] for r in ready)
        agents = _start_agents(bench, config, work)
        setup["start_clients_s"] = time.monotonic() - started
        say(f"{sum(r['devices'] for r in ready)} device connections from {len(generators)} generator(s), {len(agents)} agent(s)")
        observer = _Observer(bench)
        if not observer.subscribed.wait(30):
            raise RuntimeError("the observer could not subscribe to the root model on the root broker")

        processes = [Proc(name=f"broker {c.site}", kind="broker", pid=c.process.pid) for c in runners[0].children]
        processes += [Proc(name=f"regional {c.site}", kind="regional", pid=c.process.pid) for c in runners[1].children]
        processes += [Proc(name=f"generator {k}", kind="generator", pid=p.pid) for k, (p, _, _) in enumerate(generators)]
        processes += [Proc(name=f"agent {d}", kind="agent", pid=p.pid) for d, (p, _) in agents.items()]
        # Everything but the root is sampled before the root starts (they idle until its model arrives); the root
        # right after it connected, so its imports are not counted. The window opens when its round-0 model does.
        before = _sample_all(processes)
        runners.append(FleetRunner(fleet, sites=["root"], brokers=False))
        runners[-1].start()
        processes.append(Proc(name="root", kind="root", pid=runners[-1].children[0].process.pid))
        before.update(_sample_all(processes[-1:]))
        busy_before, t0 = proc_stats.machine_busy_ticks(), time.monotonic()
        sampler = proc_stats.LastSamples({p.name: p.pid for p in processes})

        def alive() -> None:
            for runner in runners:
                for child in runner.children:
                    if child.process.poll() is not None:
                        raise RuntimeError(f"{child.name} exited ({child.process.returncode}):\n{child.tail()}")
            for process, _, log in generators:
                if process.poll() is not None:
                    raise RuntimeError(f"a load generator exited ({process.returncode}):\n{log.read_text(errors='replace')[-2000:]}")

        for r in range(config.rounds + 1):
            if not observer.wait_for(r, max(1.0, t0 + config.timeout_s - time.monotonic()), alive):
                raise RuntimeError(f"the root's model of round {r} did not arrive within {config.timeout_s:g} s "
                                   f"(logs under {bench.directory / 'run'})")
            if r > 0:
                say(f"round {r - 1} closed in {observer.times[r] - observer.times[r - 1]:.2f} s")
        after, busy_after, t1 = sampler.finish(), proc_stats.machine_busy_ticks(), time.monotonic()
        window_s = t1 - observer.times[0]
        service_metrics = {}
        for child in [*runners[2].children, *runners[1].children]:
            port = port_from_log(child.log.read_text(errors="replace"))
            service_metrics[child.site] = scrape(port) if port is not None else {"error": "no metrics port in its log"}

        generator_results = []
        for process, out, log in generators:
            try:
                process.communicate("stop\n", timeout=60)
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"a load generator did not stop within 60 s; log {log}") from exc
            if process.returncode != 0 or not out.is_file():
                raise RuntimeError(f"a load generator failed ({process.returncode}):\n{log.read_text(errors='replace')[-2000:]}")
            generator_results.append(json.loads(out.read_text()))
        agent_results = {}
        for device, (process, log) in agents.items():
            try:
                out, _ = process.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                process.kill()
                out, _ = process.communicate()
            lines = out.strip().splitlines()
            agent_results[device] = json.loads(lines[-1]) if process.returncode == 0 and lines else {
                "error": f"exit {process.returncode}", "log": log.read_text(errors="replace")[-1000:]}
        accepted, other = count_receipts(bench, generator_results)
        diff = None
        if not bench.agents:
            diff = float(max(np.max(np.abs(observer.models[config.rounds][n] - ref)) for n, ref in
                             reference_model(bench, config.rounds, config.seed, observer.models[0]).items()))
        machine = None
        if busy_before is not None and busy_after is not None and busy_after[1] > busy_before[1]:
            machine = (busy_after[0] - busy_before[0]) / (busy_after[1] - busy_before[1])
        return FleetRun(config=config, parameters=sum(int(np.prod(s)) for s in bench.spec.values()),
                        bundle_version=bench.bundle_version, setup_s=setup, model_times=dict(observer.times), processes=processes,
                        before=before, after=after, window_s=window_s, machine_busy=machine, generator_results=generator_results,
                        agent_results=agent_results, accepted=accepted, other_receipts=other, model_max_abs_diff=diff,
                        light_devices=config.devices - len(bench.agents), devices=dict(bench.devices),
                        models=dict(observer.models), service_metrics=service_metrics)
    finally:
        if sampler is not None:
            sampler.finish()
        if observer is not None:
            observer.stop()
        for process, _, _ in generators:
            if process.poll() is None:
                process.kill()
                process.wait()
        for process, _ in agents.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        for runner in reversed(runners):
            runner.stop()
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for log in [*work.glob("*.log"), *(work / "fleet" / "run").glob("*.log")]:
                shutil.copyfile(log, keep / log.name)
        shutil.rmtree(work, ignore_errors=True)
