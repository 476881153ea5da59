"""A small fleet for the aggregator tests: fixed keys, a two-tensor spec, configs and sealed updates.

Imported by the tests and by ``crash_child.py`` (run in a subprocess that the
tests SIGKILL), so both sides build byte-identical configurations. Keys come
from fixed seeds: tests are reproducible, and never reuse production keys.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from device_agent.protocol.envelope import seal_update
from device_agent.protocol.headers import MessageKind, UpdateHeader
from device_agent.protocol.tensor_codec import Encoding
from sdk.aggregation import AggregationConfig
from sdk.aggregation.influence import InfluencePolicy
from sdk.aggregator import RegionalConfig, RootConfig, RoundPolicy

FLEET = "demo"
BUNDLE_VERSION = 3
SPEC: dict[str, tuple[tuple[int, ...], str]] = {
    "base.0.weight": ((4, 3), "float32"),
    "base.0.bias": ((4,), "float32"),
}
NORM_BOUND = 50.0
#: Bounds that never bind on this scenario's updates (norms ~2, counts < 200): tests of the arithmetic, exactly-once
#: and restarts compare with the plain sample-weighted mean. The default (adaptive) bounds have tests of their own.
LOOSE_BOUNDS = InfluencePolicy(norm="fixed", norm_bound=NORM_BOUND, weight="fixed", max_sample_count=1_000_000)


def _seed(label: str) -> bytes:
    return hashlib.sha256(f"fedge-aggregator-test:{label}".encode()).digest()


def signing_key(label: str) -> Ed25519PrivateKey:
    """A fixed Ed25519 key for ``label`` (a device, region or the root)."""
    return Ed25519PrivateKey.from_private_bytes(_seed(f"ed25519:{label}"))


def encryption_key(label: str) -> X25519PrivateKey:
    """A fixed X25519 key for ``label`` (a region or the root)."""
    return X25519PrivateKey.from_private_bytes(_seed(f"x25519:{label}"))


def device_id(region: str, index: int) -> str:
    """``eu-dev-3``: the id of device ``index`` of ``region``."""
    return f"{region}-dev-{index}"


def device_keys(region: str, count: int = 8) -> dict[str, Ed25519PublicKey]:
    """The public keys of the first ``count`` devices of ``region``."""
    return {device_id(region, i): signing_key(device_id(region, i)).public_key() for i in range(count)}


class StepClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def regional_config(region: str = "eu", **overrides: Any) -> RegionalConfig:
    """A regional config for ``region``: quorum 5, deadline 60 s, norm bound 50; ``overrides`` replace fields."""
    values: dict[str, Any] = dict(
        fleet=FLEET,
        region=region,
        encryption_key=encryption_key(region),
        signing_key=signing_key(region),
        device_keys=device_keys(region),
        root_verify_key=signing_key("root").public_key(),
        root_encryption_key=encryption_key("root").public_key(),
        spec=SPEC,
        bundle_version=BUNDLE_VERSION,
        policy=RoundPolicy(quorum=5, deadline_s=60.0),
        norm_bound=NORM_BOUND,
        aggregation=AggregationConfig(),
        influence=LOOSE_BOUNDS,
        regional_weight=0.0,
        wall_clock=lambda: 1_700_000_000.0,
    )
    values.update(overrides)
    return RegionalConfig(**values)


def root_config(regions: tuple[str, ...] = ("eu", "us"), **overrides: Any) -> RootConfig:
    """A root config trusting ``regions``: quorum = number of regions, deadline 600 s."""
    values: dict[str, Any] = dict(
        fleet=FLEET,
        encryption_key=encryption_key("root"),
        signing_key=signing_key("root"),
        region_keys={region: signing_key(region).public_key() for region in regions},
        spec=SPEC,
        bundle_version=BUNDLE_VERSION,
        policy=RoundPolicy(quorum=len(regions), deadline_s=600.0, min_updates=0),
        norm_bound=NORM_BOUND,
        wall_clock=lambda: 1_700_000_000.0,
    )
    values.update(overrides)
    return RootConfig(**values)


def initial_model(seed: int = 7) -> dict[str, np.ndarray]:
    """A global model G_0 matching SPEC."""
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, (shape, _) in SPEC.items()}


@dataclass(frozen=True, kw_only=True)
class DeviceUpdate:
    """One device's contribution: who, its delta and sample count, and the header nonce it uses."""

    device: str
    delta: dict[str, np.ndarray]
    samples: int
    nonce: bytes


def device_updates(region: str = "eu", count: int = 5, *, seed: int = 0) -> list[DeviceUpdate]:
    """``count`` devices of ``region`` with random deltas (norm well under the bound) and uneven sample counts."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        delta = {name: rng.normal(scale=0.5, size=shape).astype(np.float32) for name, (shape, _) in SPEC.items()}
        nonce = hashlib.sha256(f"{region}:{seed}:{i}".encode()).digest()[:16]
        out.append(DeviceUpdate(device=device_id(region, i), delta=delta, samples=int(rng.integers(5, 200)), nonce=nonce))
    return out


def seal(
    update: DeviceUpdate,
    *,
    round: int = 0,
    region: str = "eu",
    delta: Mapping[str, np.ndarray] | None = None,
    key: Ed25519PrivateKey | None = None,
    recipient: X25519PublicKey | None = None,
    frame_version: int = 1,
    **header: Any,
) -> bytes:
    """``update`` sealed for ``region``'s aggregator (in ``frame_version``); keyword arguments override header fields,
    the delta, the key or the recipient."""
    fields: dict[str, Any] = dict(
        kind=MessageKind.UPDATE,
        fleet=FLEET,
        sender=update.device,
        region=region,
        round=round,
        bundle_version=BUNDLE_VERSION,
        sample_count=update.samples,
        encoding=Encoding.RAW,
        nonce=update.nonce,
        timestamp_ms=1_700_000_000_000,
    )
    fields.update(header)
    return seal_update(
        UpdateHeader(**fields),
        dict(update.delta if delta is None else delta),
        recipient_public_key=recipient or encryption_key(region).public_key(),
        sender_key=key or signing_key(update.device),
        frame_version=frame_version,
    )


def reference_mean(updates: list[DeviceUpdate]) -> dict[str, np.ndarray]:
    """The sample-weighted mean of the deltas, computed directly with numpy (float64, then float32)."""
    weights = np.array([u.samples for u in updates], dtype=np.float64)
    return {
        name: (sum(w * u.delta[name].astype(np.float64) for w, u in zip(weights, updates)) / weights.sum()).astype(np.float32)
        for name in SPEC
    }


def random_nonce() -> bytes:
    """16 fresh random bytes."""
    return os.urandom(16)
