"""Three levels from ``fedge fleet init`` and ``fedge fleet up``, on real Mosquitto with real agents.

The tree (tests/sdk/fleet/conftest.py, :func:`deep_topology`): root -> middle
tier ``eu`` -> cells ``eu-a`` (2 devices) and ``eu-b`` (1), and a two-level
region ``west`` (1). Nothing is written by hand: the CLI provisions every
broker, bridge, key and service file, ``fleet up`` starts the five brokers and
five services in dependency order, and each device runs ``fedge-agent`` from
its provisioning directory for two rounds. Sniffers on the device brokers
(the cells' and west's aggregator accounts) open every update with that tier's
X25519 key; a sniffer on the root broker reads the signed global models. Each
global model must equal the numpy reference (tests/integration/reference.py:
the bounded sample-weighted mean over every device of the tree), and
``fedge fleet status`` must show every device verified, its status bridged up
two levels from the cells (and, ``--from regions``, on its cell's own broker). Then a release published at the root (bundle v2,
no canary) must reach every tier and every device through the bridges: each
service switches to v2 at a round boundary, each device installs it and has
its last round accepted on it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.keys import load_encryption_key, load_verify_key, save_private_key
from device_agent.protocol.envelope import open_model, open_update
from device_agent.protocol.topics import TopicLayout
from sdk.demo.brokers import free_port
from tests.device_agent.bundle.resign import resigned
from tests.integration.reference import Update, global_steps
from tests.sdk.broker_config.test_broker_integration import Probe
from tests.sdk.fleet.conftest import DEEP_DEVICES, DEEP_PARENTS, deep_topology
from tests.sdk.fleet.test_fleet_live import Up, agents, run, tool, workdir, write_local_data  # noqa: F401 (fixture)

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]
LAYOUT = TopicLayout(fleet="deep")
ROUNDS = 2
TOLERANCE = 1e-5


def _password(fleet_dir: Path, account: str) -> str:
    return str(json.loads((fleet_dir / "brokers/credentials/aggregators" / f"{account}.json").read_text())["password"])


def _drain(probe: Probe) -> list[tuple[str, bytes]]:
    seen = []
    while not probe.messages.empty():
        topic, payload, _ = probe.messages.get_nowait()
        seen.append((topic, payload))
    return seen


def test_three_level_fleet_from_init_and_up_matches_the_reference(workdir: Path, digits, fleet_key, bundle_factory) -> None:
    sites = ("root", *DEEP_PARENTS)
    (workdir / "topology.toml").write_text(deep_topology({s: free_port() for s in sites}, deadline_s=30))
    save_private_key(fleet_key, workdir / "fleet.key")
    bundle = bundle_factory("fedavg")
    run(tool(["fedge", "fleet", "init", "topology.toml", "--out", "fleet", "--fleet-key", "fleet.key",
              "--bundle", str(bundle)]), workdir)
    fleet_dir = workdir / "fleet"
    devices = sorted(d for cell in DEEP_DEVICES.values() for d in cell)
    for index, device in enumerate(devices):
        write_local_data(fleet_dir / "devices" / device, digits, index)
    topology_ports = {s: int(json.loads((fleet_dir / "brokers/credentials/aggregators" / f"{s}-agg.json").read_text())["port"])
                      for s in sites}
    up = Up(fleet_dir, workdir)
    probes: list[Probe] = []
    try:
        log = (workdir / "fleet-up.log").read_text()
        started = [line.split()[1] for line in log.splitlines() if line.startswith("aggregator ")]
        assert started == ["eu-a", "eu-b", "west", "eu", "root"], log  # children before parents
        root = Probe.connect("root-agg", _password(fleet_dir, "root-agg"), port=topology_ports["root"])
        probes.append(root)
        root.subscribe(LAYOUT.root_model)
        sniffers = {}
        for cell in DEEP_DEVICES:
            sniffers[cell] = Probe.connect(f"{cell}-agg", _password(fleet_dir, f"{cell}-agg"), port=topology_ports[cell])
            probes.append(sniffers[cell])
            sniffers[cell].subscribe(LAYOUT.all_device_updates)
        results = agents(fleet_dir, devices, workdir, rounds=ROUNDS)

        # The global models the root signed, G_0 .. G_ROUNDS (G_0 retained since before any device trained).
        root_key = load_verify_key(fleet_dir / "aggregators/root/keys/signing.pub")
        models: dict[int, dict[str, np.ndarray]] = {}
        deadline = time.monotonic() + 90
        while len(models) <= ROUNDS and time.monotonic() < deadline:
            try:
                topic, payload, _ = root.receive(max(0.1, deadline - time.monotonic()))
            except Exception:  # queue.Empty at the deadline: reported below with what arrived
                break
            opened = open_model(payload, trusted_signers=root_key)
            models.setdefault(opened.header.round, opened.tensors)
        assert sorted(models)[:ROUNDS + 1] == list(range(ROUNDS + 1)), (sorted(models), up.service_log("root")[-3000:])

        # Every accepted update, opened with its tier's key, grouped by the tier that took it.
        accepted = {(d, r["round"]) for d, result in results.items() for r in result["rounds"] if r["status"] == "accepted"}
        assert {r for _, r in accepted} == set(range(ROUNDS)) and len(accepted) == len(devices) * ROUNDS, results
        by_region: dict[str, dict[int, list[Update]]] = {}
        for cell, probe in sniffers.items():
            key = load_encryption_key(fleet_dir / "aggregators" / cell / "keys/encryption.key")
            senders = {d: load_verify_key(fleet_dir / "devices" / d / "keys/device.pub") for d in DEEP_DEVICES[cell]}
            seen: dict[tuple[str, int], Update] = {}
            for topic, payload in _drain(probe):
                assert payload[4] == 2, "fleet init makes every tier announce frame version 2, so devices seal it"
                update = open_update(payload, recipient_key=key, sender_public_key=senders)
                header = update.header
                assert header.region == cell and LAYOUT.device_update(header.sender) == topic
                if (header.sender, header.round) in accepted:
                    seen[(header.sender, header.round)] = (header.sample_count, update.tensors)  # a resend: same bytes
            for (device, rnd), item in sorted(seen.items()):
                by_region.setdefault(cell, {}).setdefault(rnd, []).append(item)
        assert sum(len(v) for history in by_region.values() for v in history.values()) == len(accepted)
        steps = global_steps(by_region, ROUNDS)
        for r in range(ROUNDS):
            for name, g_r in models[r].items():
                np.testing.assert_allclose(models[r + 1][name], g_r.astype(np.float64) + steps[r][name], atol=TOLERANCE,
                                           rtol=0, err_msg=f"G_{r + 1}[{name}]")
        assert "round 1 closed" in up.service_log("eu"), up.service_log("eu")[-3000:]

        # Every device's signed status reached the root broker (two bridges up from a cell) and verifies.
        shown = json.loads(run(tool(["fedge", "fleet", "status", str(fleet_dir), "--json"]), workdir).stdout)
        assert list(shown["regions"]) == ["eu-a", "eu-b", "west"]
        rows = {row["device"]: row for rows in shown["regions"].values() for row in rows}
        assert sorted(rows) == devices
        assert {row["verdict"] for row in rows.values()} == {"verified"}, rows
        by_cell = json.loads(run(tool(["fedge", "fleet", "status", str(fleet_dir), "--from", "regions", "--json"]),
                                 workdir).stdout)  # each cell's own broker (a middle tier's holds no device status)
        assert {r: sorted(row["device"] for row in rows if row["verdict"] == "verified")
                for r, rows in by_cell["regions"].items()} == DEEP_DEVICES

        # A release published at the root reaches every tier and the devices under the cells through the bridges:
        # v2 (the same model re-signed as version 2, promoted at once); every service switches at a round boundary,
        # every device installs it and gets a round accepted on it.
        v2 = resigned(bundle, workdir / "v2.fedge", fleet_key, version=2)
        run(tool(["fedge", "release", "publish", str(fleet_dir), str(v2), "--no-canary", "--chunk-size", "16384"]), workdir)
        agents(fleet_dir, devices, workdir, rounds=3)
        for site in sites:
            log = up.service_log(site)
            assert "switching from bundle v1 to v2" in log, (site, "\n".join(
                line for line in log.splitlines() if "DEBUG" not in line and ("release" in line or "round" in line))[-3000:])
        shown = json.loads(run(tool(["fedge", "fleet", "status", str(fleet_dir), "--json"]), workdir).stdout)
        for row in (row for rows in shown["regions"].values() for row in rows):
            assert (row["bundle_version"], row["release"]["state"], row["last_round_status"]) == (2, "installed", "accepted"), row
    finally:
        for probe in probes:
            probe.close()
        up.stop()
