"""``fedge aggregator regional|root`` as real processes: what they log at the default level, text and JSON Lines.

Both services run from TOML files (with ``[metrics] port = 0``) against one
real Mosquitto broker; simulated devices send sealed updates of the bundle's
shared parameters; the broker is restarted mid-run. The regional log (text)
and the root log (``--log-format json`` before the subcommand) must tell the
whole story without ``-v``: start, connection, the metrics URL, round
opened and closed with counts, forwarding and the root's receipt, the lost
connection and the reconnect, and the stop.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle.archive import verify_bundle
from device_agent.keys import save_private_key, save_public_key
from device_agent.protocol.envelope import open_model, seal_update
from device_agent.protocol.headers import UpdateHeader
from tests.mosquitto_broker import MosquittoFactory
from tests.sdk.aggregator_service.conftest import Started
from tests.sdk.aggregator_service.harness import WAIT, Device, Observer, TierKeys
from tests.sdk.aggregator_service.scrape import scrape

pytestmark = pytest.mark.mosquitto

FLEET = "logs"
REPO = Path(__file__).resolve().parents[3]
LIMIT_S = 60.0


def _write_keys(directory: Path, region: TierKeys, root: TierKeys, devices: list[Device], fleet_key) -> None:
    (directory / "devices").mkdir(parents=True)
    (directory / "regions").mkdir()
    save_private_key(region.signing, directory / "eu-sign.key")
    save_private_key(region.encryption, directory / "eu-enc.key")
    save_private_key(root.signing, directory / "root-sign.key")
    save_private_key(root.encryption, directory / "root-enc.key")
    save_public_key(root.signing.public_key(), directory / "root-sign.pub")
    save_public_key(root.encryption.public_key(), directory / "root-enc.pub")
    save_public_key(region.signing.public_key(), directory / "regions" / "eu.pub")
    save_public_key(fleet_key.public_key(), directory / "fleet.pub")
    for device in devices:
        save_public_key(device.key.public_key(), directory / "devices" / f"{device.device_id}.pub")


def _service_tail(port: int, client: str) -> str:
    return f"""
[broker]
host = "127.0.0.1"
port = {port}
client_id = "{client}"
reconnect_min_s = 1
reconnect_max_s = 1

[service]
tick_s = 0.05

[metrics]
port = 0
"""


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-c", "from sdk.cli.main import main; main()", *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        assert proc.poll() is None, f"exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{pattern!r} not logged within {timeout:g} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def test_services_log_their_story_at_the_default_level(mosquitto: MosquittoFactory, started: Started, tmp_path: Path,
                                                       bundle_factory, fleet_key) -> None:
    rng = np.random.default_rng(3)
    bundle = bundle_factory("fedavg")
    manifest = verify_bundle(bundle, fleet_key.public_key())
    spec = manifest.shared_spec()
    broker = mosquitto.start()
    region, root = TierKeys(), TierKeys()
    devices = [Device(device_id=f"eu-dev-{i}", region="eu", samples=20 + i,
                      delta={n: (0.01 * rng.standard_normal(shape)).astype(dtype) for n, (shape, dtype) in spec.items()})
               for i in range(2)]
    _write_keys(tmp_path, region, root, devices, fleet_key)
    common = f'fleet = "{FLEET}"\nbundle = "{bundle}"\nfleet_public_key = "fleet.pub"\n'
    (tmp_path / "regional.toml").write_text(f"""[aggregator]
{common}region = "eu"
store = "eu.sqlite"
signing_key = "eu-sign.key"
encryption_key = "eu-enc.key"
root_verify_key = "root-sign.pub"
root_encryption_key = "root-enc.pub"
device_keys_dir = "devices"

[round]
quorum = 2
deadline_s = 60
""" + _service_tail(broker.port, "eu-agg"))
    (tmp_path / "root.toml").write_text(f"""[aggregator]
{common}store = "root.sqlite"
signing_key = "root-sign.key"
encryption_key = "root-enc.key"
region_keys_dir = "regions"

[round]
deadline_s = 60
""" + _service_tail(broker.port, "root-agg"))
    observer = started.observer(Observer(broker.port, client_id="observer")).subscribe(
        f"fedge/{FLEET}/model/global", f"fedge/{FLEET}/dev/+/down/receipt")
    eu_log, root_log = tmp_path / "regional.log", tmp_path / "root.log"
    regional = _start(["aggregator", "regional", "--config", str(tmp_path / "regional.toml"), "--max-seconds", str(LIMIT_S)],
                      eu_log)
    root_proc = _start(["--log-format", "json", "aggregator", "root", "--config", str(tmp_path / "root.toml"),
                        "--max-seconds", str(LIMIT_S)], root_log)
    try:
        metrics_url = _wait_for(eu_log, r"metrics on (http://127\.0\.0\.1:\d+/metrics)", regional).group(1)

        def next_round() -> int:
            [(_, blob)] = observer.receive(lambda t: t.endswith("/model/global"))
            return open_model(blob, trusted_signers=region.signing.public_key()).header.round

        assert next_round() == 0
        for device in devices:
            header = UpdateHeader.create(fleet=FLEET, sender=device.device_id, region="eu", round=0,
                                         bundle_version=manifest.bundle_version, sample_count=device.samples)
            blob = seal_update(header, device.delta, recipient_public_key=region.encryption.public_key(),
                               sender_key=device.key)
            observer.publish(f"fedge/{FLEET}/dev/{device.device_id}/up/update", blob)
        assert next_round() == 1
        _wait_for(eu_log, r"the root acknowledged", regional)
        assert scrape(metrics_url).value("fedge_rounds_closed_total") == 1

        broker.restart()
        _wait_for(eu_log, r"reconnect 1", regional, timeout=WAIT * 2)
        _wait_for(root_log, r"reconnect 1", root_proc, timeout=WAIT * 2)
    finally:
        for proc in (regional, root_proc):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (regional, root_proc):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    assert regional.returncode == 0 and root_proc.returncode == 0, (eu_log.read_text()[-2000:], root_log.read_text()[-2000:])

    text = eu_log.read_text()
    for expected in (
        r"INFO sdk\.cli\.aggregator_cmd: regional aggregator eu of fleet logs: store .*eu\.sqlite, bundle v1, quorum 2",
        r"INFO .*: regional aggregator eu starting: broker 127\.0\.0\.1:\d+ as eu-agg, plain TCP",
        r"INFO .*: metrics on http://127\.0\.0\.1:\d+/metrics",
        r"INFO .*: connected to 127\.0\.0\.1:\d+ as eu-agg\n",
        r"INFO .*: regional aggregator eu: round 0 open",
        r"INFO .*: regional aggregator eu: round 0 closed \(quorum\) after [\d.]+ s: 2 accepted, 0 duplicate, 0 rejected; \d+ samples",
        r"INFO .*: region eu forwarded round 0: 2 updates, \d+ samples",
        r"INFO .*: round 0: the root acknowledged the aggregate",
        r"INFO .*: regional aggregator eu: round 1 open",
        r"WARNING .*: connection of eu-agg to 127\.0\.0\.1:\d+ lost",
        r"INFO .*: connected to 127\.0\.0\.1:\d+ as eu-agg \(reconnect 1\)",
        r"INFO .*: regional aggregator eu stopped \(stopped\) after 2 connection\(s\)",
    ):
        assert re.search(expected, text), f"missing {expected!r} in:\n{text}"
    assert "DEBUG" not in text

    entries = [json.loads(line) for line in root_log.read_text().splitlines() if line.startswith("{")]
    non_json = [line for line in root_log.read_text().splitlines() if not line.startswith("{")]
    assert len(non_json) == 1 and non_json[0].startswith("stopped ("), non_json  # the command's summary (stdout)
    messages = [e["message"] for e in entries]
    assert {e["level"] for e in entries} <= {"INFO", "WARNING"}
    for expected in (r"root aggregator of fleet logs: store .*root\.sqlite", r"root aggregator starting: broker",
                     r"connected to 127\.0\.0\.1:\d+ as root-agg$", r"root aggregator: round 0 open",
                     r"aggregate from eu: accepted", r"root aggregator: round 0 closed \(quorum\) after [\d.]+ s: 1 accepted",
                     r"root aggregator: round 1 open", r"connection of root-agg .* lost", r"\(reconnect 1\)",
                     r"root aggregator stopped"):
        assert any(re.search(expected, m) for m in messages), f"missing {expected!r} in {messages}"
