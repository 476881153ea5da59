"""Three levels on real bridged Mosquitto, every aggregator a ``fedge aggregator`` process; a middle tier SIGKILLed.

The tree (``fedge broker-config`` generates the five brokers from one
topology with ``parent`` chains; no TLS, loopback)::

    root broker <- root aggregator
      |- eu broker     <- middle tier "eu"       (no devices)
      |    |- eu-a broker <- cell "eu-a"  <- 3 devices
      |    `- eu-b broker <- cell "eu-b"  <- 3 devices
      `- west broker   <- region "west" (a two-level region right below the root) <- 2 devices

Devices are paho clients on their own ACL-confined accounts that publish
real sealed updates (small random deltas of the bundle's shared layers).
Round 0 runs through undisturbed. In round 1 the middle tier is SIGKILLed
the moment eu-a's aggregate reaches the eu broker (the middle may or may not
have committed it, and its receipt may or may not have gone out); eu-b's
aggregate then reaches the eu broker while nothing subscribes there, and
only after that is a new middle process started on the same store.

Every global model must equal the numpy sample-weighted reference (G_{r+1}
= G_r + sum_k n_k d_k / sum_k n_k over all eight devices; bounds set loose
so they never bind), each tier's store must hold each child exactly once
per round, and each round's model must reach every device through every level. A cell
device's status must climb both bridges to the root.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.bundle.archive import verify_bundle
from device_agent.keys import save_private_key, save_public_key
from device_agent.protocol.envelope import OpenedModel, open_model, seal_update
from device_agent.protocol.headers import UpdateHeader
from device_agent.protocol.receipts import ReceiptStatus, open_receipt
from sdk.aggregator.store import AggregatorStore
from sdk.broker_config import generate_topology, parse_topology
from sdk.broker_config.acl import bridge_state_topic
from tests.integration.processes import ServiceProcess
from tests.mosquitto_broker import MOSQUITTO_USER, MosquittoFactory, free_port
from tests.sdk.broker_config.test_broker_integration import Fleet, Probe

pytestmark = pytest.mark.mosquitto

FLEET = "deep"
WAIT = 30.0
"""Bound on every wait for something that should arrive (resends back off to 2 s; processes start in seconds)."""
PARENTS = {"eu": None, "eu-a": "eu", "eu-b": "eu", "west": None}
DEVICES = {"eu-a": 3, "eu-b": 3, "west": 2}
LIMIT_S = 120.0


@dataclass(frozen=True)
class TierKeys:
    signing: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    encryption: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)


def _topology_toml(ports: dict[str, int]) -> str:
    text = f"""
[fleet]
name = "{FLEET}"
message_size_limit = 262144
[tls]
enabled = false
[monitor]
enabled = false
[root]
host = "127.0.0.1"
bind = "127.0.0.1"
port = {ports["root"]}
aggregators = ["root-agg"]
"""
    for name, parent in PARENTS.items():
        devices = [f"{name}-d{i}" for i in range(DEVICES.get(name, 0))]
        text += f"""
[[regions]]
name = "{name}"
host = "127.0.0.1"
bind = "127.0.0.1"
port = {ports[name]}
aggregators = ["{name}-agg"]
devices = {json.dumps(devices)}
""" + (f'parent = "{parent}"\n' if parent else "")
    return text


class LightProcess(ServiceProcess):
    """``fedge aggregator <tier>`` without importing the rest of the CLI (dashboard, plots: seconds on a busy
    machine, for each of the six processes), logging at INFO."""

    def entry(self) -> list[str]:
        return ["from device_agent.logformat import install_handler; install_handler('text'); "
                "from sdk.cli.aggregator_cmd import aggregator; aggregator(prog_name='fedge aggregator')"]


class Tree:
    """The brokers, keys and service files of the test; :meth:`process` starts a tier."""

    def __init__(self, factory: MosquittoFactory, work: Path, bundle: Path, fleet_key: Ed25519PrivateKey) -> None:
        ports = {name: free_port() for name in ("root", *PARENTS)}
        owner = MOSQUITTO_USER if os.geteuid() == 0 else None
        generated = generate_topology(parse_topology(_topology_toml(ports)), factory.workspace() / "fleet", owner=owner)
        self.fleet = Fleet(generated=generated,
                           brokers={n: factory.start(config_file=generated.broker(n).config_file) for n in ("root", *PARENTS)})
        self.layout = generated.topology.layout
        self.work = work
        self.bundle = bundle
        self.manifest = verify_bundle(bundle, fleet_key.public_key())
        self.keys = {name: TierKeys() for name in ("root", *PARENTS)}
        save_public_key(fleet_key.public_key(), work / "fleet.pub")
        self.devices = {f"{cell}-d{i}": (cell, Ed25519PrivateKey.generate()) for cell, n in DEVICES.items() for i in range(n)}

    def write_config(self, name: str) -> tuple[str, Path]:
        """(tier, path) of ``name``'s service TOML: ``root``, ``middle`` or ``regional``."""
        directory = self.work / name
        directory.mkdir(exist_ok=True)
        (directory / "children").mkdir(exist_ok=True)
        keys = self.keys[name]
        save_private_key(keys.signing, directory / "sign.key")
        save_private_key(keys.encryption, directory / "enc.key")
        children = [c for c, p in PARENTS.items() if p == (None if name == "root" else name)]
        devices = [d for d, (cell, _) in self.devices.items() if cell == name]
        for child in children:
            save_public_key(self.keys[child].signing.public_key(), directory / "children" / f"{child}.pub")
        for device in devices:
            save_public_key(self.devices[device][1].public_key(), directory / "children" / f"{device}.pub")
        account = f"{name}-agg"
        (directory / "password").write_text(self.fleet.credentials(account)["password"] + "\n")
        common = f'fleet = "{FLEET}"\nstore = "{directory / "store.sqlite"}"\nbundle = "{self.bundle}"\n' \
                 f'fleet_public_key = "{self.work / "fleet.pub"}"\nsigning_key = "sign.key"\nencryption_key = "enc.key"\n'
        if name == "root":
            tier, aggregator, rounds = "root", 'region_keys_dir = "children"\n', "deadline_s = 60\n"
        else:
            parent = PARENTS[name] or "root"
            save_public_key(self.keys[parent].signing.public_key(), directory / "parent-sign.pub")
            save_public_key(self.keys[parent].encryption.public_key(), directory / "parent-enc.pub")
            aggregator = f'region = "{name}"\nparent_verify_key = "parent-sign.pub"\nparent_encryption_key = "parent-enc.pub"\n' \
                         + (f'parent = "{PARENTS[name]}"\n' if PARENTS[name] else "")
            if devices:
                tier = "regional"
                aggregator += 'device_keys_dir = "children"\n'
                rounds = f"quorum = {len(devices)}\ndeadline_s = 60\n"
                rounds += '[influence]\nnorm = "fixed"\nnorm_bound = 1000.0\nweight = "fixed"\nmax_sample_count = 1000000\n'
            else:
                tier, rounds = "middle", "deadline_s = 60\n"
                aggregator += 'child_keys_dir = "children"\n'
        port = self.fleet.brokers[name].ports[0]
        (directory / "service.toml").write_text(f"""\
[aggregator]
{common}{aggregator}
[round]
{rounds}
[broker]
host = "127.0.0.1"
port = {port}
client_id = "{account}-svc"
username = "{account}"
password_file = "password"
share_group = "{name}-aggregators"
max_packet_size = 262144
reconnect_min_s = 1
reconnect_max_s = 2

[service]
tick_s = 0.05
resend_min_s = 0.5
resend_max_s = 2.0
""")
        return tier, directory / "service.toml"

    def process(self, name: str, log: str) -> ServiceProcess:
        tier, config = self.write_config(name)
        return LightProcess(tier, config, self.work / f"{log}.log", max_seconds=LIMIT_S)

    def accepted(self, name: str) -> list[tuple[str, int]]:
        """(sender, round) of every row of ``name``'s store, read as a second member."""
        identity = {"root": f"root:{FLEET}/root", "eu": f"middle:{FLEET}/eu"}.get(name, f"region:{FLEET}/{name}")
        store = AggregatorStore.open(self.work / name / "store.sqlite", identity=identity, member="check")
        try:
            return sorted((row.sender, row.round) for row in store.accepted_since(0))
        finally:
            store.close()


def _wait_bridges(tree: Tree, probes: list[Probe]) -> None:
    """Until every parent broker has seen its children's bridges connect (retained state 1)."""
    for parent in ("root", "eu"):
        watcher = tree.fleet.client(f"{parent}-agg")
        probes.append(watcher)
        children = [c for c, p in PARENTS.items() if p == (None if parent == "root" else parent)]
        for child in children:
            watcher.subscribe(bridge_state_topic(tree.fleet.generated.topology, child))
        states: dict[str, bytes] = {}
        while len(states) < len(children) or set(states.values()) != {b"1"}:
            topic, payload, _ = watcher.receive(WAIT)
            states[topic] = payload


def _next(probe: Probe, want: str, deadline: float) -> bytes:
    """The next message on topic ``want`` (others are dropped)."""
    while True:
        topic, payload, _ = probe.receive(max(0.1, deadline - time.monotonic()))
        if topic == want:
            return payload


def test_three_levels_global_model_and_a_killed_middle_tier(mosquitto: MosquittoFactory, bundle_factory, fleet_key,
                                                            tmp_path: Path) -> None:
    tree = Tree(mosquitto, tmp_path, bundle_factory("fedavg"), fleet_key)
    layout = tree.layout
    spec = tree.manifest.shared_spec()
    rng = np.random.default_rng(5)
    probes: list[Probe] = []
    with ExitStack() as stack:
        stack.callback(lambda: [p.close() for p in probes])
        _wait_bridges(tree, probes)
        root_watch = tree.fleet.client("root-agg")
        probes.append(root_watch)
        root_watch.subscribe(layout.root_model)
        root_watch.subscribe(layout.all_region_statuses)
        eu_watch = tree.fleet.client("eu-agg")  # what crosses the eu broker: the cells' aggregates
        probes.append(eu_watch)
        eu_watch.subscribe(layout.all_region_aggregates)
        clients = {}
        for device in tree.devices:
            client = tree.fleet.client(device)
            probes.append(client)
            client.subscribe(layout.global_model)
            client.subscribe(layout.device_receipt(device))
            clients[device] = client

        # A cell device's status climbs two bridges to the root, under its cell's subtree.
        clients["eu-b-d0"].publish(layout.device_status("eu-b-d0"), b"status probe")
        assert _next(root_watch, layout.region_device_status("eu-b", "eu-b-d0"), time.monotonic() + WAIT) == b"status probe"

        processes = {name: tree.process(name, name) for name in PARENTS}
        for process in processes.values():
            stack.callback(process.stop)
        for process in processes.values():
            process.wait_connected(60.0)
        processes["root"] = tree.process("root", "root")
        stack.callback(processes["root"].stop)
        deadline = time.monotonic() + LIMIT_S

        def global_model(round_: int) -> dict[str, np.ndarray]:
            while True:
                opened = open_model(_next(root_watch, layout.root_model, deadline), trusted_signers=tree.keys["root"].signing.public_key())
                if opened.header.round == round_:
                    return opened.tensors

        def model_of(device: str, round_: int) -> OpenedModel:
            """The model ``device``'s cell serves for ``round_`` (earlier ones, and republished copies, skipped)."""
            cell = tree.devices[device][0]
            while True:
                served = open_model(_next(clients[device], layout.global_model, deadline),
                                    trusted_signers=tree.keys[cell].signing.public_key())
                assert served.header.region == cell and served.header.round <= round_
                if served.header.round == round_:
                    return served

        def train(devices: list[str], round_: int, model: dict[str, np.ndarray]) -> dict[str, tuple[int, dict[str, np.ndarray]]]:
            """Each device takes its cell's model of ``round_`` (it must be exactly ``model``), sends an update, gets its receipt."""
            sent = {}
            for device in devices:
                cell, key = tree.devices[device]
                served = model_of(device, round_)
                for name, value in model.items():
                    assert served.tensors[name].tobytes() == value.tobytes(), f"{device} round {round_}: {name} differs"
                samples = int(rng.integers(5, 60))
                delta = {name: (0.01 * rng.standard_normal(shape)).astype(np.float32) for name, (shape, _) in spec.items()}
                header = UpdateHeader.create(fleet=FLEET, sender=device, region=cell, round=round_,
                                             bundle_version=tree.manifest.bundle_version, sample_count=samples)
                clients[device].publish(layout.device_update(device), seal_update(
                    header, delta, recipient_public_key=tree.keys[cell].encryption.public_key(), sender_key=key))
                receipt = open_receipt(_next(clients[device], layout.device_receipt(device), deadline),
                                       trusted_signers=tree.keys[cell].signing.public_key())
                assert (receipt.round, receipt.status) == (round_, ReceiptStatus.ACCEPTED)
                sent[device] = (samples, delta)
            return sent

        def reference(model: dict[str, np.ndarray], sent: dict[str, tuple[int, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
            total = sum(n for n, _ in sent.values())
            return {name: model[name] + sum(n * d[name].astype(np.float64) for n, d in sent.values()) / total for name in model}

        def close_enough(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
            for name in want:
                np.testing.assert_allclose(got[name], want[name], atol=2e-6, rtol=0)

        # Round 0, undisturbed.
        g0 = global_model(0)
        sent0 = train(list(tree.devices), 0, g0)
        g1 = global_model(1)
        close_enough(g1, reference(g0, sent0))

        # Round 1: eu-a first; the middle tier dies the moment eu-a's aggregate reaches its broker.
        while not eu_watch.messages.empty():
            eu_watch.messages.get_nowait()  # round 0's aggregates (all answered before G_1 was published)
        sent1 = train([d for d in tree.devices if tree.devices[d][0] in ("eu-a", "west")], 1, g1)
        _next(eu_watch, layout.region_aggregate("eu-a"), deadline)
        processes["eu"].sigkill()
        sent1 |= train([d for d in tree.devices if tree.devices[d][0] == "eu-b"], 1, g1)
        _next(eu_watch, layout.region_aggregate("eu-b"), deadline)  # reached the eu broker, nobody subscribed: lost
        processes["eu"].stop()
        processes["eu"] = tree.process("eu", "eu-restarted")
        stack.callback(processes["eu"].stop)
        g2 = global_model(2)
        close_enough(g2, reference(g1, sent1))

        # Round 2's model reaches every device through every level (every tier serves exactly G_2).
        for device, client in clients.items():
            served = model_of(device, 2)
            for name, value in g2.items():
                assert served.tensors[name].tobytes() == value.tobytes()

    # Each tier counted each child exactly once per round, across the kill.
    assert tree.accepted("root") == sorted((child, r) for child in ("eu", "west") for r in (0, 1))
    assert tree.accepted("eu") == sorted((cell, r) for cell in ("eu-a", "eu-b") for r in (0, 1))
    for cell, count in DEVICES.items():
        assert tree.accepted(cell) == sorted((f"{cell}-d{i}", r) for i in range(count) for r in (0, 1))
    restarted_log = (tmp_path / "eu-restarted.log").read_text()
    assert "round 1 closed" in restarted_log, restarted_log[-3000:]
    # Its own aggregate comes back on its subscription and is skipped, never counted as a drop.
    assert "dropped by the service: none" in restarted_log, restarted_log[-3000:]

