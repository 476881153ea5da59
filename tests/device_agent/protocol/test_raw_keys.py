"""Raw 32-byte key export, and key ids over it."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from device_agent.keys import key_id
from device_agent.protocol.raw_keys import key_to_raw


def test_raw_keys_ed25519_round_trip_through_raw_bytes() -> None:
    private = Ed25519PrivateKey.generate()
    assert key_to_raw(Ed25519PrivateKey.from_private_bytes(key_to_raw(private))) == key_to_raw(private)
    public = Ed25519PublicKey.from_public_bytes(key_to_raw(private.public_key()))
    assert key_id(public) == key_id(private.public_key())


def test_raw_keys_x25519_round_trip_through_raw_bytes() -> None:
    private = X25519PrivateKey.generate()
    raw = key_to_raw(private)
    assert len(raw) == 32 and key_to_raw(X25519PrivateKey.from_private_bytes(raw)) == raw
    assert key_to_raw(X25519PublicKey.from_public_bytes(key_to_raw(private.public_key()))) == key_to_raw(private.public_key())


def test_raw_keys_rfc8032_secret_gives_its_public_key_and_id() -> None:
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))
    public_raw = key_to_raw(private.public_key())
    assert public_raw.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert key_id(private.public_key()) == hashlib.sha256(public_raw).hexdigest()[:16]


def test_raw_keys_refuse_non_keys() -> None:
    with pytest.raises(TypeError):
        key_to_raw(b"not a key")  # type: ignore[arg-type]
