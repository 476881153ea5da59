"""``fedge fleet up``: run one host's share of a fleet (its brokers and aggregator services) in the foreground.

Each site (``root`` or a region) is a Mosquitto process started from
``brokers/<site>/mosquitto.conf`` and a ``fedge aggregator`` process started
from ``aggregators/<site>/`` (``regional``, ``middle`` or ``root``). Brokers start
parents first, so each bridge finds its parent's broker listening; services
start children first (:mod:`sdk.fleet.tiers`: leaf regions, then middle tiers,
then the root), so every tier listens when the tier above publishes round 0. Children log to
``run/<kind>-<site>.log``; their pids go to ``run/<kind>-<site>.pid`` so
``fedge fleet add/remove/rekey/move --reload`` can send them SIGHUP. On
SIGINT/SIGTERM (or ``max_seconds``) everything is stopped, aggregators first;
a child that dies ends the run with a failure naming it and its log's tail.
This is the one-host (lab, edge gateway, small fleet) way; on separate hosts
run the same two commands per site under systemd (docs/fleet.md).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from device_agent.errors import FedgeError
from sdk.broker_config import layout as broker_layout
from sdk.fleet import layout, tiers
from sdk.fleet.day2 import OpenedFleet, pid_file

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 20.0
_CONNECTED = "connected to "


class FleetUpError(FedgeError):
    """A broker or service would not start or died; the message names it and ends with its log's tail."""


@dataclass
class Child:
    """One process ``fleet up`` started."""

    kind: str
    site: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def name(self) -> str:
        """``broker eu``, ``aggregator root``..."""
        return f"{self.kind} {self.site}"

    def tail(self, chars: int = 2000) -> str:
        """The end of its log."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _port_open(port: int, host: str) -> bool:
    from sdk.demo.brokers import port_open

    return port_open(port, host)


class FleetRunner:
    """Starts, watches and stops the brokers and services of ``sites`` (``brokers`` / ``services`` False: leave them out)."""

    def __init__(self, fleet: OpenedFleet, *, sites: Sequence[str], brokers: bool = True, services: bool = True) -> None:
        known = tiers.sites(fleet.spec.topology)
        unknown = sorted(set(sites) - set(known))
        if unknown:
            raise FleetUpError(f"no site {', '.join(unknown)} in this fleet (sites: {', '.join(known)})")
        self.fleet = fleet
        self.sites = [s for s in known if s in sites]  # topology order: root first
        self.brokers = brokers
        self.services = services
        self.children: list[Child] = []
        self.run_dir = fleet.directory / layout.RUN_DIR

    def _spawn(self, kind: str, site: str, argv: list[str], cwd: Path) -> Child:
        self.run_dir.mkdir(mode=0o700, exist_ok=True)
        log = self.run_dir / f"{kind}-{site}.log"
        with open(log, "ab") as handle:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            process = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                       env=env, start_new_session=True)
        pid_file(self.fleet.directory, kind, site).write_text(f"{process.pid}\n")
        child = Child(kind=kind, site=site, process=process, log=log)
        self.children.append(child)
        return child

    def _start_broker(self, site: str) -> None:
        from sdk.demo.brokers import ensure_mosquitto

        topology = self.fleet.spec.topology
        address = topology.address(site)
        config = self.fleet.directory / layout.BROKERS_DIR / site / broker_layout.CONFIG_FILE
        child = self._spawn("broker", site, [ensure_mosquitto(), "-c", str(config)], config.parent)
        host = "127.0.0.1" if topology.tls.enabled or address.bind is None else address.bind
        self._wait(child, lambda: _port_open(address.port, host), f"listening on {host}:{address.port}")

    def _start_service(self, site: str) -> None:
        directory = self.fleet.directory / layout.aggregator_dir(site)
        tier = tiers.tier_of(self.fleet.spec.topology, site).value
        argv = [sys.executable, "-c", "from sdk.cli.main import main; main()", "-v", "aggregator", tier,
                "--config", str(directory / layout.service_config(tier))]
        child = self._spawn("aggregator", site, argv, directory)
        self._wait(child, lambda: _CONNECTED in child.tail(200_000), "connected to its broker")

    def _wait(self, child: Child, ready, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if child.process.poll() is not None or time.monotonic() > deadline:
                raise FleetUpError(f"{child.name} did not start ({what}) within {START_TIMEOUT_S:g} s; "
                                   f"log {child.log}:\n{child.tail()}")
            time.sleep(0.05)
        logger.info("%s started (pid %d), log %s", child.name, child.process.pid, child.log)

    def start(self) -> None:
        """Brokers (parents first), then services (children first, the root's last); everything stops again if one fails."""
        topology = self.fleet.spec.topology
        try:
            if self.brokers:
                for site in tiers.broker_start_order(topology, self.sites):
                    self._start_broker(site)
            if self.services:
                for site in tiers.service_start_order(topology, self.sites):
                    self._start_service(site)
        except BaseException:
            self.stop()
            raise

    def watch(self, stop: threading.Event, max_seconds: float | None = None) -> None:
        """Until ``stop`` is set or ``max_seconds`` pass; FleetUpError as soon as a child has died."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        while not stop.wait(0.2):
            for child in self.children:
                if child.process.poll() is not None:
                    raise FleetUpError(f"{child.name} exited with code {child.process.returncode}; "
                                       f"log {child.log}:\n{child.tail()}")
            if deadline is not None and time.monotonic() >= deadline:
                return

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every child, services before brokers, newest first; SIGKILL what is still running after ``timeout_s``."""
        for child in sorted(self.children, key=lambda c: c.kind != "aggregator"):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(timeout_s)
            pid_file(self.fleet.directory, child.kind, child.site).unlink(missing_ok=True)
        self.children.clear()
