"""Everything the demo's fleet needs on disk before anything starts.

Keys (fleet signing key; root and per-region signing + encryption keys; one
Ed25519 key per device), the signed FedAlt bundle, a generated Mosquitto
topology (root + one bridged broker per region, loopback only, fresh ports,
ACLs and passwords), and per device: its client's training split as
``train.npz``, its key files and its :class:`AgentConfig`. The test split
stays in memory: devices evaluate on it at the end.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.daemon.backoff import BackoffPolicy
from device_agent.daemon.config import AgentConfig, BrokerConfig, DataConfig
from device_agent.keys import save_private_key, save_public_key
from device_agent.trainer import TrainBudget
from sdk.broker_config import BrokerAddress, GeneratedTopology, Region, RootBroker, Topology, generate_topology
from sdk.datasets.federated import ClientData, FederatedDataset, LabeledArrays
from sdk.datasets.watch import TimeSplit, load_watch
from sdk.demo.brokers import LOOPBACK, broker_owner, free_port
from sdk.demo.settings import DemoSettings

logger = logging.getLogger(__name__)

FLEET = "demo"
MODEL_NAME = "watch-cnn"
ROOT_ACCOUNT = "root-agg"
#: Largest MQTT payload; the CNN's shared layers (~15k float32) fit in one message.
MESSAGE_SIZE_LIMIT = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class TierKeys:
    """An aggregator's two key pairs: Ed25519 to sign models and receipts, X25519 to be sealed to."""

    signing: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    encryption: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)


@dataclass(frozen=True, kw_only=True)
class DemoDevice:
    """One device: its agent config (state, data and keys under its own directory) and its held-out test split."""

    device_id: str
    region: str
    config: AgentConfig
    public_key: Ed25519PublicKey
    train_examples: int
    test: LabeledArrays


@dataclass(frozen=True, kw_only=True)
class DemoFleet:
    """What :func:`prepare_fleet` wrote and generated; ``regions`` in topology order."""

    workdir: Path
    bundle_path: Path
    fleet_public_key: Ed25519PublicKey
    generated: GeneratedTopology
    root_keys: TierKeys
    region_keys: dict[str, TierKeys]
    devices: tuple[DemoDevice, ...]

    @property
    def regions(self) -> tuple[str, ...]:
        """Region names in topology order."""
        return tuple(r.name for r in self.generated.topology.regions)

    def devices_in(self, region: str) -> tuple[DemoDevice, ...]:
        """The devices of ``region`` (empty for an unknown name)."""
        return tuple(d for d in self.devices if d.region == region)

    def password(self, username: str) -> str:
        """The generated MQTT password of ``username``."""
        return _password(self.generated, username)

    def port(self, broker: str) -> int:
        """The plain loopback port of ``"root"`` or a region's broker."""
        topology = self.generated.topology
        if broker == "root":
            return topology.root.address.port
        return next(r.address.port for r in topology.regions if r.name == broker)


def choose_clients(dataset: FederatedDataset, count: int) -> tuple[ClientData, ...]:
    """The first ``count`` clients taking one from each region in turn (so regions split evenly), in data set order."""
    by_region = [[c for c in dataset.clients if c.region == region] for region in dataset.regions]
    interleaved = [clients[i] for i in range(max(map(len, by_region))) for clients in by_region if i < len(clients)]
    return tuple(interleaved[:count])


def aggregator_account(region: str) -> str:
    """The MQTT account of ``region``'s aggregator."""
    return f"{region}-agg"


def fleet_topology(regions: dict[str, list[str]]) -> Topology:
    """Root + one broker per region on free loopback ports, plain MQTT (nothing leaves 127.0.0.1)."""

    def address() -> BrokerAddress:
        return BrokerAddress(host=LOOPBACK, bind=LOOPBACK, port=free_port(), tls_port=free_port())

    return Topology(
        fleet=FLEET,
        root=RootBroker(address=address(), aggregators=(ROOT_ACCOUNT,)),
        regions=tuple(Region(name=name, address=address(), aggregators=(aggregator_account(name),), devices=tuple(ids))
                      for name, ids in regions.items()),
        message_size_limit=MESSAGE_SIZE_LIMIT,
    )


def build_watch_bundle(settings: DemoSettings, *, signing_key: Ed25519PrivateKey, out_path: Path) -> None:
    """The signed FedAlt bundle of :class:`~sdk.models.PersonalizedCNN1D` for (6, 100) windows and 7 classes."""
    import torch

    from device_agent.bundle.manifest import OptimizerKind, TrainingMode
    from sdk.artifacts import TrainingSpec
    from sdk.bundle_builder import build_bundle
    from sdk.models import BASE_HEAD_SPLIT, PersonalizedCNN1D

    torch.manual_seed(settings.seed)
    build_bundle(PersonalizedCNN1D(6, 7), example_input=torch.zeros(2, 6, 100), split=BASE_HEAD_SPLIT,
                 spec=TrainingSpec(mode=TrainingMode.FEDALT, mu=settings.mu, optimizer=OptimizerKind.ADAMW,
                                   learning_rate=settings.learning_rate),
                 signing_key=signing_key, out_path=out_path, model_name=MODEL_NAME)


def prepare_fleet(settings: DemoSettings, workdir: Path) -> DemoFleet:
    """Write keys, the bundle, the broker files and every device's data and config under ``workdir``."""
    dataset = load_watch(seed=settings.seed, split=TimeSplit(), regions_by="side")
    clients = choose_clients(dataset, settings.devices)
    keys_dir = workdir / "keys"
    keys_dir.mkdir(parents=True)
    fleet_key = Ed25519PrivateKey.generate()
    save_private_key(fleet_key, keys_dir / "fleet.key")
    save_public_key(fleet_key.public_key(), keys_dir / "fleet.pub")
    bundle_path = workdir / f"{MODEL_NAME}.fedge"
    build_watch_bundle(settings, signing_key=fleet_key, out_path=bundle_path)
    logger.info("built and signed %s (fedalt, mu=%g)", bundle_path, settings.mu)

    regions: dict[str, list[str]] = {}
    for client in clients:
        regions.setdefault(str(client.region), []).append(client.client_id)
    generated = generate_topology(fleet_topology(regions), workdir / "brokers", owner=broker_owner())
    root_keys = TierKeys()
    region_keys = {name: TierKeys() for name in regions}
    save_public_key(root_keys.signing.public_key(), keys_dir / "root.pub")
    for name, tier in region_keys.items():
        save_public_key(tier.signing.public_key(), keys_dir / f"{name}.pub")
        save_public_key(tier.encryption.public_key(), keys_dir / f"{name}-agg.x25519.pub")

    topology = generated.topology
    ports = {r.name: r.address.port for r in topology.regions}
    devices = []
    for index, client in enumerate(clients):
        region = str(client.region)
        directory = workdir / "devices" / client.client_id
        directory.mkdir(parents=True)
        np.savez(directory / "train.npz", x=client.train.x, y=client.train.y)
        device_key = Ed25519PrivateKey.generate()
        save_private_key(device_key, directory / "device.key")
        signers = (keys_dir / "root.pub", keys_dir / f"{region}.pub")
        config = AgentConfig(
            device_id=client.client_id, fleet=FLEET, region=region,
            broker=BrokerConfig(host=LOOPBACK, port=ports[region], keepalive_s=30, connect_timeout_s=5.0,
                                max_packet_size=MESSAGE_SIZE_LIMIT, password=_password(generated, client.client_id)),
            bundle_path=bundle_path, install_dir=directory / "bundle", state_dir=directory / "state",
            fleet_public_key=keys_dir / "fleet.pub", device_private_key=directory / "device.key",
            aggregator_public_key=keys_dir / f"{region}-agg.x25519.pub",
            model_signers=signers, receipt_signers=(keys_dir / f"{region}.pub",),
            data=DataConfig(path=directory / "train.npz"),
            budget=TrainBudget(epochs=settings.epochs, batch_size=settings.batch_size),
            threads=1,  # many devices share this machine's cores
            seed=settings.seed + index,
            receipt_timeout_s=10.0, max_attempts=3,
            backoff=BackoffPolicy(initial_s=0.5, max_s=5.0),
        )
        devices.append(DemoDevice(device_id=client.client_id, region=region, config=config,
                                  public_key=device_key.public_key(), train_examples=len(client.train), test=client.test))
    return DemoFleet(workdir=workdir, bundle_path=bundle_path, fleet_public_key=fleet_key.public_key(),
                     generated=generated, root_keys=root_keys, region_keys=region_keys, devices=tuple(devices))


def _password(generated: GeneratedTopology, username: str) -> str:
    return str(json.loads(generated.credential_files[username].read_text())["password"])
