"""Shared fixtures for the wire-protocol tests: fixed keys, a header factory and small tensors."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.protocol.headers import UpdateHeader


@pytest.fixture
def device_key() -> Ed25519PrivateKey:
    """The signing key of device ``dev-1``."""
    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


@pytest.fixture
def other_device_key() -> Ed25519PrivateKey:
    """The signing key of device ``dev-2``."""
    return Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132)))


@pytest.fixture
def region_key() -> X25519PrivateKey:
    """The regional aggregator's encryption key."""
    return X25519PrivateKey.from_private_bytes(bytes(range(32, 64)))


@pytest.fixture
def make_header() -> Callable[..., UpdateHeader]:
    """Build an UpdateHeader for ``dev-1`` in round 5; keyword arguments override fields."""

    def make(**overrides: Any) -> UpdateHeader:
        fields: dict[str, Any] = dict(
            fleet="demo",
            region="eu",
            sender="dev-1",
            round=5,
            bundle_version=3,
            sample_count=120,
            nonce=bytes(range(16)),
            timestamp_ms=1_700_000_000_000,
        )
        fields.update(overrides)
        return UpdateHeader(**fields)

    return make


@pytest.fixture
def tensors() -> dict[str, np.ndarray]:
    """A small model delta: two float32 tensors and an int64 counter."""
    rng = np.random.default_rng(0)
    return {
        "base.0.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "base.0.bias": rng.normal(size=(4,)).astype(np.float32),
        "steps": np.array([7], dtype=np.int64),
    }


def corrupt(blob: bytes, *, seed: int, count: int) -> Iterator[bytes]:
    """``count`` seeded corruptions of ``blob``: truncation, bit flip, inserted byte or random garbage."""
    rng = random.Random(seed)
    for _ in range(count):
        mutated = bytearray(blob)
        action = rng.randrange(4)
        if action == 0:
            del mutated[rng.randrange(len(mutated)) :]
        elif action == 1:
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        elif action == 2:
            mutated.insert(rng.randrange(len(mutated)), rng.randrange(256))
        else:
            mutated = bytearray(rng.randbytes(rng.randrange(300)))
        yield bytes(mutated)


@pytest.fixture
def corruptions() -> Callable[..., Iterator[bytes]]:
    """:func:`corrupt`, as a fixture so tests need not import conftest."""
    return corrupt
