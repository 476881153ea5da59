"""The key material a device agent holds, loaded from the files its config names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from device_agent.daemon.config import AgentConfig
from device_agent.daemon.errors import ConfigError
from device_agent.keys import load_recipient_key, load_signing_key, load_verify_key

_K = TypeVar("_K")


@dataclass(frozen=True, kw_only=True)
class DeviceKeys:
    """The device's identity key, its aggregator's encryption key and the keys it trusts.

    ``model_signers``: root and region keys whose signed models the device
    trains from. ``receipt_signers``: aggregator keys whose receipts it believes.
    """

    signing_key: Ed25519PrivateKey = field(repr=False)
    aggregator_key: X25519PublicKey
    model_signers: tuple[Ed25519PublicKey, ...]
    receipt_signers: tuple[Ed25519PublicKey, ...]


def _load(key: str, path: Path, loader: Callable[[Path], _K]) -> _K:
    try:
        return loader(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{key}: cannot load {path}: {exc}") from exc


def load_device_keys(config: AgentConfig) -> DeviceKeys:
    """Read every key file of ``config``; ConfigError naming the key for a missing or wrong-typed file."""
    return DeviceKeys(
        signing_key=_load("keys.device_private_key", config.device_private_key, load_signing_key),
        aggregator_key=_load("keys.aggregator_public_key", config.aggregator_public_key, load_recipient_key),
        model_signers=tuple(_load("keys.model_signers", p, load_verify_key) for p in config.model_signers),
        receipt_signers=tuple(_load("keys.receipt_signers", p, load_verify_key) for p in config.receipt_signers),
    )
