"""Loading, saving and identifying Ed25519 (signing) and X25519 (encryption) keys.

Keys are stored as PEM (PKCS#8 private, SubjectPublicKeyInfo public) so that
standard tools can read them; private key files are written 0600.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

PublicKey = Union[Ed25519PublicKey, X25519PublicKey]
PrivateKey = Union[Ed25519PrivateKey, X25519PrivateKey]

#: What a caller may pass as "the keys I trust": one key, several, or key id -> key.
TrustedKeys = Union[Ed25519PublicKey, Iterable[Ed25519PublicKey], Mapping[str, Ed25519PublicKey]]


def raw_public_bytes(key: PublicKey) -> bytes:
    """The 32 raw bytes of a public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: PublicKey) -> str:
    """Short stable identifier of a public key: hex of the first 8 bytes of SHA-256 of its raw bytes."""
    return hashlib.sha256(raw_public_bytes(key)).digest()[:8].hex()


def trusted_key_map(trusted: TrustedKeys) -> dict[str, Ed25519PublicKey]:
    """Normalise any accepted form of trusted keys to ``{key_id: key}``."""
    if isinstance(trusted, Ed25519PublicKey):
        return {key_id(trusted): trusted}
    if isinstance(trusted, Mapping):
        return {key_id(k): k for k in trusted.values()}
    keys = list(trusted)
    if not all(isinstance(k, Ed25519PublicKey) for k in keys):
        raise TypeError("trusted keys must be Ed25519 public keys")
    return {key_id(k): k for k in keys}


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def save_private_key(key: PrivateKey, path: str | os.PathLike[str]) -> None:
    """Write a private key as unencrypted PKCS#8 PEM with mode 0600."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_private(Path(path), pem)


def save_public_key(key: PublicKey, path: str | os.PathLike[str]) -> None:
    """Write a public key as SubjectPublicKeyInfo PEM."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Read an Ed25519 or X25519 private key from PEM; ValueError for any other key type."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, (Ed25519PrivateKey, X25519PrivateKey)):
        raise ValueError(f"{path}: expected an Ed25519 or X25519 private key, got {type(key).__name__}")
    return key


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """Read an Ed25519 or X25519 public key from PEM; ValueError for any other key type."""
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, (Ed25519PublicKey, X25519PublicKey)):
        raise ValueError(f"{path}: expected an Ed25519 or X25519 public key, got {type(key).__name__}")
    return key


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (a fleet or device signing key)."""
    key = load_private_key(path)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: expected an Ed25519 private key")
    return key


def load_encryption_key(path: str | os.PathLike[str]) -> X25519PrivateKey:
    """Read an X25519 private key (an aggregator's decryption key)."""
    key = load_private_key(path)
    if not isinstance(key, X25519PrivateKey):
        raise ValueError(f"{path}: expected an X25519 (encryption) private key")
    return key


def load_recipient_key(path: str | os.PathLike[str]) -> X25519PublicKey:
    """Read an X25519 public key (the aggregator an update is sealed to)."""
    key = load_public_key(path)
    if not isinstance(key, X25519PublicKey):
        raise ValueError(f"{path}: expected an X25519 (encryption) public key")
    return key


def load_verify_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read an Ed25519 public key (a fleet or device verification key)."""
    key = load_public_key(path)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: expected an Ed25519 public key")
    return key
