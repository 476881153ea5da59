"""The fleet benchmark's fleet: one topology, provisioned by ``fedge fleet init`` exactly as in production.

:func:`provision` writes a topology of a root broker and ``regions`` bridged
regional brokers on free loopback ports (plain MQTT), ``devices`` spread
evenly over them, then runs :func:`sdk.fleet.provision.init_fleet` on it with
a freshly built and signed bundle: every device gets its own Ed25519 key,
broker account (password, pattern ACL) and provisioning directory; every
aggregator its own keys, registry and TOML (plus a ``[metrics]`` endpoint on
loopback, which the bench reads at the end). The model is the digits MLP
(:class:`~sdk.models.PersonalizedMLP`, 64 inputs, trunk ``base`` 128-64
shared, head personal, FedAlt), so the real training agents can train on
scikit-learn's digits, which ships with scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdk.demo.brokers import broker_owner, free_port
from sdk.fleet import layout

FLEET = "bench"
HIDDEN = (128, 64)
CLASSES = 10
INPUTS = 64
AGENT_EXAMPLES = 150
MESSAGE_SIZE_LIMIT = 1024 * 1024
MONITOR = "fedge-monitor"  # the topology's default monitoring account


@dataclass(frozen=True, kw_only=True)
class BenchFleet:
    """What :func:`provision` wrote: the fleet directory, regions in order, device -> (region, index), agents' ids,
    and the shared parameters' shapes."""

    directory: Path
    regions: tuple[str, ...]
    devices: dict[str, tuple[str, int]]
    agents: tuple[str, ...]
    spec: dict[str, tuple[int, ...]]
    bundle_version: int

    def device_dir(self, device: str) -> Path:
        """The provisioning directory of ``device``."""
        return self.directory / layout.device_dir(device)

    def signing_pub(self, site: str) -> Path:
        """The Ed25519 public key ``site`` (``root`` or a region) signs models and receipts with."""
        return self.directory / layout.aggregator_dir(site) / layout.SIGNING_PUB

    def monitor_credentials(self) -> Path:
        """The monitoring account's credentials JSON (its password and the root broker's port)."""
        from sdk.broker_config.render import credential_path
        from sdk.broker_config.topology import Account, Role

        return self.directory / layout.BROKERS_DIR / credential_path(
            Account(username=MONITOR, role=Role.MONITOR, broker="root", region=None))


def region_names(count: int) -> tuple[str, ...]:
    """``r01``, ``r02``... (as many as ``count``)."""
    return tuple(f"r{k + 1:02d}" for k in range(count))


def topology_text(*, devices: int, regions: int, deadline_s: float) -> str:
    """Root + ``regions`` regions on fresh loopback ports, ``devices`` split evenly, devices' state inside their directory."""
    if regions < 1 or devices < regions:
        raise ValueError(f"need at least one device per region, got {devices} devices for {regions} regions")

    def address() -> str:
        return f'host = "127.0.0.1"\nbind = "127.0.0.1"\nport = {free_port()}\ntls_port = {free_port()}\n'

    blocks = []
    for k, name in enumerate(region_names(regions)):
        count = devices // regions + (1 if k < devices % regions else 0)
        blocks.append(f'[[regions]]\nname = "{name}"\n{address()}aggregators = ["{name}-agg"]\ndevice_count = {count}\n')
    return (f'[fleet]\nname = "{FLEET}"\nmessage_size_limit = {MESSAGE_SIZE_LIMIT}\n\n[tls]\nenabled = false\n\n'
            f'[root]\n{address()}aggregators = ["root-agg"]\n\n' + "\n".join(blocks) +
            '\n[devices]\nstate_dir = "var"\n\n[devices.training]\nepochs = 1\nbatch_size = 32\nthreads = 1\n\n'
            '[devices.submit]\nreceipt_timeout_s = 30.0\nmax_attempts = 5\n\n'
            f'[aggregators]\ndeadline_s = {float(deadline_s)}\nquorum_fraction = 1.0\n')


def build_bundle(out_path: Path, signing_key, *, seed: int = 0) -> None:  # signing_key: Ed25519PrivateKey
    """The signed FedAlt bundle of the digits MLP (module docstring)."""
    import torch

    from device_agent.bundle.manifest import TrainingMode
    from sdk.artifacts import TrainingSpec
    from sdk.bundle_builder import build_bundle as build
    from sdk.models import BASE_HEAD_SPLIT, PersonalizedMLP

    torch.manual_seed(seed)
    build(PersonalizedMLP(INPUTS, HIDDEN, CLASSES), example_input=torch.zeros(2, INPUTS), split=BASE_HEAD_SPLIT,
          spec=TrainingSpec(mode=TrainingMode.FEDALT, learning_rate=0.01), signing_key=signing_key, out_path=out_path,
          model_name="fleet-bench-mlp", kinds=("portable",))


def choose_agents(regions: tuple[str, ...], devices_by_region: dict[str, list[str]], count: int) -> tuple[str, ...]:
    """``count`` devices to run as real agents: the first device of each region in turn, then the second..."""
    chosen: list[str] = []
    depth = 0
    while len(chosen) < count:
        added = False
        for region in regions:
            members = devices_by_region[region]
            if depth < len(members) and len(chosen) < count:
                chosen.append(members[depth])
                added = True
        if not added:
            break
        depth += 1
    return tuple(chosen)


def write_agent_data(device_dir: Path, index: int) -> None:
    """The digits slice agent ``index`` trains on, where its agent.toml expects it (``var/data/local.npz``)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    start = (index * AGENT_EXAMPLES) % (len(x) - AGENT_EXAMPLES)
    data = device_dir / "var" / "data"
    data.mkdir(parents=True, exist_ok=True)
    np.savez(data / "local.npz", x=(x[start:start + AGENT_EXAMPLES] / 16.0).astype(np.float32),
             y=y[start:start + AGENT_EXAMPLES].astype(np.int64))


@dataclass(frozen=True, kw_only=True)
class SignedBundle:
    """A bundle already built and the fleet key that signed it (Ed25519PrivateKey)."""

    path: Path
    key: Any


def provision(workdir: Path, *, devices: int, regions: int, agents: int, deadline_s: float,
              bundle: SignedBundle | None = None) -> BenchFleet:
    """Build the bundle (None: the digits MLP of the module docstring) and run ``fedge fleet init`` under
    ``workdir/fleet``; write the agents' data (digits: the bundle must take 64 inputs and 10 classes then)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent.bundle.archive import verify_bundle
    from sdk.bench.fleet_metrics import enable_metrics
    from sdk.fleet.provision import init_fleet
    from sdk.fleet.spec import parse_fleet_spec

    if not 0 <= agents <= devices:
        raise ValueError(f"agents must be in 0..{devices}, got {agents}")
    if bundle is None:
        bundle = SignedBundle(path=workdir / "model.fedge", key=Ed25519PrivateKey.generate())
        build_bundle(bundle.path, bundle.key)
    key = bundle.key
    text = topology_text(devices=devices, regions=regions, deadline_s=deadline_s)
    spec = parse_fleet_spec(text)
    fleet = init_fleet(spec, workdir / "fleet", topology_text=text, fleet_key=key, bundle=bundle.path, owner=broker_owner())
    names = region_names(regions)
    by_region = {r.name: list(r.devices) for r in spec.topology.regions}
    index = {device: (region, i) for i, (region, device) in
             enumerate((region, device) for region in names for device in by_region[region])}
    chosen = choose_agents(names, by_region, agents)
    for k, device in enumerate(chosen):
        write_agent_data(fleet.devices[device], k)
    for site in (layout.ROOT_SITE, *names):
        enable_metrics(fleet.aggregators[site] / (layout.ROOT_CONFIG if site == layout.ROOT_SITE else layout.REGIONAL_CONFIG))
    manifest = verify_bundle(bundle.path, key.public_key())
    shared = {name: tuple(shape) for name, (shape, _dtype) in manifest.shared_spec().items()}
    return BenchFleet(directory=fleet.directory, regions=names, devices=index, agents=chosen, spec=shared,
                      bundle_version=manifest.bundle_version)


def parameters(spec: dict[str, tuple[int, ...]]) -> int:
    """How many shared parameters ``spec`` holds."""
    return sum(math.prod(shape) for shape in spec.values())
