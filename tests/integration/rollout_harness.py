"""A provisioned fleet running for real, for the rollout Proof: brokers, services, agents, the operator's CLIs.

:class:`LiveFleet` makes a fleet with ``fedge fleet init``'s code on loopback
ports (two regions of three devices, the digits data split between them),
starts the three Mosquitto brokers and the aggregator services with
:class:`~sdk.fleet.up.FleetRunner` (subprocesses), and each device as a
``fedge-agent run`` subprocess. The operator acts through the ``fedge`` CLI
in subprocesses; the test reads the devices' verified statuses the way
``fedge release status`` does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from device_agent.protocol.status import DeviceStatus
from sdk.demo.brokers import broker_owner, free_port
from sdk.fleet.day2 import open_fleet
from sdk.fleet.provision import init_fleet
from sdk.fleet.spec import parse_fleet_spec
from sdk.fleet.up import FleetRunner
from sdk.release.fleet_ops import open_release_fleet, verified_statuses
from tests.mosquitto_broker import reachable_dir

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
EU = ("eu-dev-0001", "eu-dev-0002", "eu-dev-0003")
US = ("us-dev-0001", "us-dev-0002", "us-dev-0003")


def topology(ports: Mapping[str, tuple[int, int]]) -> str:
    """Root + eu + us on loopback, three devices each, short deadlines, fast release settings."""

    def address(name: str) -> str:
        plain, secure = ports[name]
        return f'host = "127.0.0.1"\nbind = "127.0.0.1"\nport = {plain}\ntls_port = {secure}\n'

    return f"""
[fleet]
name = "lab"
message_size_limit = 262144

[root]
{address("root")}aggregators = ["root-agg"]

[[regions]]
name = "eu"
{address("eu")}aggregators = ["eu-agg"]
devices = {json.dumps(list(EU))}

[[regions]]
name = "us"
{address("us")}aggregators = ["us-agg"]
device_count = 3

[devices]
state_dir = "var"
validation_path = "var/data/val.npz"

[devices.training]
epochs = 1
batch_size = 32
threads = 1

[devices.submit]
receipt_timeout_s = 4.0
max_attempts = 3

[devices.backoff]
initial_s = 0.2
max_s = 2.0

[devices.release]
settle_s = 0.2
chunk_timeout_s = 5.0
recheck_s = 10.0
trial_epochs = 5

[aggregators]
deadline_s = 1.5

[aggregators.service]
sender_rate_per_s = 20.0
tick_s = 0.05
resend_min_s = 1.0
resend_max_s = 2.0
"""


class Agent:
    """One ``fedge-agent -v run`` subprocess, its log appended to ``log``."""

    def __init__(self, device_dir: Path) -> None:
        self.device_dir = device_dir
        self.name = device_dir.name
        self.log = device_dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        handle = self.log.open("ab")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([str(BIN / "fedge-agent"), "-v", "run", "--config", str(self.device_dir / "agent.toml")],
                                     cwd=self.device_dir, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                     env=env)
        handle.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: nothing flushed, no goodbye."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class LiveFleet:
    """The whole fleet, running (module docstring). ``close`` stops everything and removes the directory."""

    def __init__(self, *, bundle: Path, fleet_key, digits) -> None:
        self.started = time.monotonic()
        self.work = reachable_dir("fedge-rollout-")
        ports = {site: (free_port(), free_port()) for site in ("root", "eu", "us")}
        text = topology(ports)
        made = init_fleet(parse_fleet_spec(text), self.work / "fleet", topology_text=text, fleet_key=fleet_key,
                          bundle=bundle, owner=broker_owner())
        self.dir = made.directory
        for region in ("eu", "us"):
            # A quorum above the region's size: rounds close at the deadline, paced as a real fleet's would be,
            # instead of as fast as six processes can train (which starves a 2-core machine).
            config = self.dir / "aggregators" / region / "regional.toml"
            config.write_text(re.sub(r"(?m)^quorum = \d+$", "quorum = 4", config.read_text()))
        x, y = digits
        for index, device in enumerate((*EU, *US)):
            data = self.dir / "devices" / device / "var" / "data"
            data.mkdir(parents=True, exist_ok=True)
            start = index * 280
            np.savez(data / "local.npz", x=x[start:start + 200], y=y[start:start + 200])
            np.savez(data / "val.npz", x=x[start + 200:start + 280], y=y[start + 200:start + 280])
        self.runner = FleetRunner(open_fleet(self.dir), sites=["root", "eu", "us"])
        self.runner.start()
        self.agents = {device: Agent(self.dir / "devices" / device) for device in (*EU, *US)}
        self.release = open_release_fleet(self.dir)

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.runner.stop()
        keep = os.environ.get("FEDGE_PROOF_LOGS")  # a directory to copy every log to (debugging a failure)
        if keep:
            target = Path(keep)
            target.mkdir(parents=True, exist_ok=True)
            for log in (*self.dir.glob("devices/*/agent.log"), *self.dir.glob("run/*.log")):
                shutil.copyfile(log, target / f"{log.parent.name}-{log.name}")
        shutil.rmtree(self.work, ignore_errors=True)

    # -- what the operator runs ---------------------------------------------------------------

    def fedge(self, *args: str, timeout: float = 120.0) -> str:
        """``fedge ARGS`` in a subprocess; its stdout (AssertionError with stderr when it fails)."""
        argv = [str(BIN / "fedge"), *args]
        done = subprocess.run(argv, cwd=self.work, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert done.returncode == 0, f"{shlex.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}"
        return done.stdout

    def stage(self, release: int) -> str:
        """Release ``release``'s stage in the repository (``unstaged`` when none)."""
        return self.release.repository().release(release).stage_name

    # -- what the devices say -----------------------------------------------------------------

    def statuses(self) -> dict[str, DeviceStatus | None]:
        """Every device's verified status (from the root broker)."""
        return verified_statuses(self.release.statuses(timeout_s=5.0))

    def wait(self, what: str, ready: Callable[[dict[str, DeviceStatus | None]], bool], *, timeout: float = 90.0,
             also: Callable[[], None] | None = None) -> dict[str, DeviceStatus | None]:
        """Poll the statuses until ``ready``; ``also`` runs between polls (e.g. the controller's step)."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = self.statuses()
            if ready(statuses):
                return statuses
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + "\n".join(
                f"  {d}: {_summary(s)}" for d, s in sorted(statuses.items())) + self._tails()
            if also is not None:
                also()
            time.sleep(0.5)

    def service_log(self, site: str) -> str:
        return (self.dir / "run" / f"aggregator-{site}.log").read_text(errors="replace")

    def _tails(self) -> str:
        return "".join(f"\n--- aggregator {site} ---\n{self.service_log(site)[-1500:]}" for site in ("root", "eu", "us"))

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _summary(status: DeviceStatus | None) -> str:
    if status is None:
        return "no verified status"
    r = status.release
    return (f"online={status.online} v{status.bundle_version} round={status.last_round} {status.last_round_status} "
            f"release={r.state.value}:{r.version} {r.reason[:100]}")
