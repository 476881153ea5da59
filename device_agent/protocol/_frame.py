"""The signed frame shared by every fedge message (private to the protocol package).

Layout::

    magic 4 bytes | version u8 | record_len u16 | record (canonical JSON) | body | signature 64

The Ed25519 signature covers every byte before it; the magic differs per
message type, so a signature made for one type never verifies as another.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_agent.errors import AuthenticationError, MalformedMessageError
from device_agent.keys import key_id
from device_agent.protocol._reader import ByteReader, pack_u8, pack_u16
from device_agent.protocol.headers import MAX_HEADER_BYTES, PROTOCOL_VERSION

SIGNATURE_BYTES = 64


@dataclass(frozen=True, kw_only=True)
class Frame:
    """A structurally valid, not yet authenticated frame."""

    record: bytes
    body: memoryview
    signed: memoryview
    signature: bytes


def frame_prefix(magic: bytes, record: bytes) -> bytes:
    """Magic, version and the length-prefixed record: the start of every frame."""
    if len(record) > MAX_HEADER_BYTES:
        raise ValueError(f"record of {len(record)} bytes exceeds {MAX_HEADER_BYTES}")
    return magic + pack_u8(PROTOCOL_VERSION) + pack_u16(len(record)) + record


def sign_frame(unsigned: bytes, signer_key: Ed25519PrivateKey) -> bytes:
    """Append the signature over ``unsigned`` (a prefix plus body)."""
    if not isinstance(signer_key, Ed25519PrivateKey):
        raise TypeError("signer_key must be an Ed25519PrivateKey")
    return unsigned + signer_key.sign(unsigned)


def split_frame(blob: bytes | bytearray | memoryview, *, magic: bytes, what: str, min_body: int, max_bytes: int) -> Frame:
    """Parse the frame structure; MalformedMessageError for anything off (no crypto here)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise MalformedMessageError(f"{what}: expected bytes, got {type(blob).__name__}")
    if len(blob) > max_bytes:
        raise MalformedMessageError(f"{what}: {len(blob)} bytes exceeds the limit of {max_bytes}")
    reader = ByteReader(blob, what=what)
    reader.expect(magic, "magic")
    if (version := reader.u8("version")) != PROTOCOL_VERSION:
        raise MalformedMessageError(f"{what}: unsupported protocol version {version}")
    record_len = reader.u16("record length")
    if record_len > MAX_HEADER_BYTES:
        raise MalformedMessageError(f"{what}: record length {record_len} exceeds {MAX_HEADER_BYTES}")
    record = bytes(reader.take(record_len, "record"))
    body_len = reader.remaining - SIGNATURE_BYTES
    if body_len < min_body:
        raise MalformedMessageError(f"{what}: truncated ({body_len} body bytes, need at least {min_body})")
    body = reader.take(body_len, "body")
    signature = bytes(reader.take(SIGNATURE_BYTES, "signature"))
    view = memoryview(blob).cast("B")
    return Frame(record=record, body=body, signed=view[: len(view) - SIGNATURE_BYTES], signature=signature)


def verify_frame(frame: Frame, keys: Iterable[Ed25519PublicKey]) -> str:
    """The key id of the first key whose signature checks out; AuthenticationError if none does."""
    for key in keys:
        try:
            key.verify(frame.signature, frame.signed)
        except InvalidSignature:
            continue
        return key_id(key)
    raise AuthenticationError()
