"""Aggregator services as real processes for the crash tests: their TOML files (docs/aggregation.md) and a handle.

``write_regional_config`` / ``write_root_config`` write the key files and the
service's TOML for the demo's fleet; :class:`ServiceProcess` runs
``fedge -v aggregator regional|root --config`` in a subprocess (its log in a
file), so a test can SIGKILL it at any moment and start another on the same
SQLite store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from device_agent.keys import save_private_key, save_public_key
from sdk.demo.fleet import FLEET, MESSAGE_SIZE_LIMIT, ROOT_ACCOUNT, DemoFleet, aggregator_account

#: A bound, not a wait: a service that imports torch on a machine busy with parallel test workers
#: can take tens of seconds to connect; the test goes on the moment it logs its connection.
START_LIMIT_S = 60.0
_SERVICE = """
[broker]
host = "127.0.0.1"
port = {port}
client_id = "{account}-svc"
username = "{account}"
password_file = "password"
share_group = "{group}"
max_packet_size = {limit}
reconnect_min_s = 1
reconnect_max_s = 2

[service]
tick_s = 0.05
flush_every_s = 5.0
resend_min_s = 1.0
resend_max_s = 4.0
"""


def write_regional_config(fleet: DemoFleet, region: str, directory: Path, *, deadline_s: float) -> Path:
    """Key files and a ``regional.toml`` for ``region``'s service (store under ``aggregators/``); its path."""
    directory.mkdir()
    (directory / "devices").mkdir()
    keys = fleet.region_keys[region]
    save_private_key(keys.signing, directory / "sign.key")
    save_private_key(keys.encryption, directory / "enc.key")
    save_public_key(fleet.root_keys.signing.public_key(), directory / "root-sign.pub")
    save_public_key(fleet.root_keys.encryption.public_key(), directory / "root-enc.pub")
    save_public_key(fleet.fleet_public_key, directory / "fleet.pub")
    for device in fleet.devices_in(region):
        save_public_key(device.public_key, directory / "devices" / f"{device.device_id}.pub")
    account = aggregator_account(region)
    (directory / "password").write_text(fleet.password(account) + "\n")
    config = directory / "regional.toml"
    config.write_text(f"""\
[aggregator]
fleet = "{FLEET}"
region = "{region}"
store = "{fleet.workdir / 'aggregators' / f'{region}.sqlite'}"
bundle = "{fleet.bundle_path}"
fleet_public_key = "fleet.pub"
signing_key = "sign.key"
encryption_key = "enc.key"
root_verify_key = "root-sign.pub"
root_encryption_key = "root-enc.pub"
device_keys_dir = "devices"

[round]
quorum = {len(fleet.devices_in(region))}
deadline_s = {deadline_s}
""" + _SERVICE.format(port=fleet.port(region), account=account, group=f"{region}-aggregators", limit=MESSAGE_SIZE_LIMIT))
    return config


def write_root_config(fleet: DemoFleet, directory: Path, *, deadline_s: float) -> Path:
    """Key files and a ``root.toml`` for the root service (store ``aggregators/root.sqlite``); its path."""
    directory.mkdir()
    (directory / "regions").mkdir()
    save_private_key(fleet.root_keys.signing, directory / "sign.key")
    save_private_key(fleet.root_keys.encryption, directory / "enc.key")
    save_public_key(fleet.fleet_public_key, directory / "fleet.pub")
    for region, keys in fleet.region_keys.items():
        save_public_key(keys.signing.public_key(), directory / "regions" / f"{region}.pub")
    (directory / "password").write_text(fleet.password(ROOT_ACCOUNT) + "\n")
    config = directory / "root.toml"
    config.write_text(f"""\
[aggregator]
fleet = "{FLEET}"
store = "{fleet.workdir / 'aggregators' / 'root.sqlite'}"
bundle = "{fleet.bundle_path}"
fleet_public_key = "fleet.pub"
signing_key = "sign.key"
encryption_key = "enc.key"
region_keys_dir = "regions"

[round]
deadline_s = {deadline_s}
""" + _SERVICE.format(port=fleet.port("root"), account=ROOT_ACCOUNT, group="root", limit=MESSAGE_SIZE_LIMIT))
    return config


class ServiceProcess:
    """``fedge -v aggregator <tier> --config`` in a subprocess, its log in ``log``; stopped after ``max_seconds`` at most."""

    def __init__(self, tier: str, config: Path, log: Path, *, max_seconds: float) -> None:
        self.log = log
        self._log_file = log.open("w")
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", *self.entry(), tier, "--config", str(config), "--max-seconds", str(max_seconds)],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
            cwd=Path(__file__).resolve().parents[2])

    def entry(self) -> list[str]:
        """The ``-c`` program and the arguments before the tier: ``fedge -v aggregator``."""
        return ["from sdk.cli.main import main; main()", "-v", "aggregator"]

    def text(self) -> str:
        """Everything the process logged so far."""
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def wait_connected(self, timeout_s: float = START_LIMIT_S) -> None:
        """Until the service logged its connection (and had time to subscribe); fails if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while "connected to 127.0.0.1" not in self.text():
            assert self.alive(), f"service exited early:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"service not connected in {timeout_s:g} s:\n{self.text()[-3000:]}"
            time.sleep(0.05)
        time.sleep(0.3)  # the SUBSCRIBE follows the CONNACK

    def sigkill(self) -> None:
        """SIGKILL (nothing flushed, no goodbye), and reap it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (clean stop), SIGKILL if it has not ended within 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.sigkill()
        self._log_file.close()
