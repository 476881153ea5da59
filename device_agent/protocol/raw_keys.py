"""Keys as their raw 32 bytes (the form used in test vectors, database rows and provisioning).

Loading needs no helper: ``Ed25519PrivateKey.from_private_bytes(raw)``,
``Ed25519PublicKey.from_public_bytes(raw)`` and the X25519 equivalents take
the 32 bytes and raise ValueError for any other length. No files here:
:mod:`device_agent.keys` stores keys as PEM files and defines ``key_id``.
"""

from __future__ import annotations

from typing import Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from device_agent.keys import raw_public_bytes

AnyKey = Union[Ed25519PrivateKey, Ed25519PublicKey, X25519PrivateKey, X25519PublicKey]


def key_to_raw(key: AnyKey) -> bytes:
    """The 32 raw bytes of an Ed25519 or X25519 key, private or public."""
    if isinstance(key, (Ed25519PrivateKey, X25519PrivateKey)):
        return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    if isinstance(key, (Ed25519PublicKey, X25519PublicKey)):
        return raw_public_bytes(key)
    raise TypeError(f"expected an Ed25519 or X25519 key, got {type(key).__name__}")
