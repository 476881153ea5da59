"""The signed frame shared by every fedge message (private to the protocol package).

Layout::

    magic 4 bytes | version u8 | record_len u16 | record (canonical JSON) | body | signature 64

The version byte says what the signature covers (docs/protocol.md, "Frames"):

- version 1: Ed25519 over every byte before the signature;
- version 2 (prehashed, sealed updates only): Ed25519 over ``PREHASH_CONTEXT ||
  SHA-256(every byte before the signature)``, so one SHA-256 pass (hardware
  SHA extensions on x86 and most ARMv8 servers) replaces Ed25519's internal
  SHA-512 over a large body, and that digest names the frame's content for
  exactly-once.

The magic differs per message type and the version byte is part of the
signed bytes, so a signature made for one type or version never verifies as another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_agent.errors import AuthenticationError, MalformedMessageError
from device_agent.keys import key_id
from device_agent.protocol._reader import ByteReader, pack_u8, pack_u16
from device_agent.protocol.headers import MAX_HEADER_BYTES, PROTOCOL_VERSION

SIGNATURE_BYTES = 64
FRAME_V1 = PROTOCOL_VERSION
"""Ed25519 over the frame's bytes (every message type)."""
FRAME_PREHASHED = 2
"""Ed25519 over ``PREHASH_CONTEXT || SHA-256(frame bytes)`` (sealed updates)."""
FRAME_VERSIONS = frozenset({FRAME_V1, FRAME_PREHASHED})
"""Every frame version this code reads."""
PREHASH_CONTEXT = b"fedge frame v2: Ed25519 over SHA-256\x00"
"""Domain separation: no version-1 frame starts with these bytes (they start with a magic ``FDG?``)."""
_V1_ONLY = frozenset({FRAME_V1})


@dataclass(frozen=True, kw_only=True)
class Frame:
    """A structurally valid, not yet authenticated frame (``version`` 1 or 2)."""

    version: int
    record: bytes
    body: memoryview
    signed: memoryview
    signature: bytes

    @cached_property
    def _prehashed(self) -> tuple[bytes, bytes] | None:
        return None if self.version == FRAME_V1 else prehash_message(self.signed)

    @property
    def message(self) -> bytes | memoryview:
        """What the signature must cover: ``signed`` itself (version 1) or the context and its SHA-256 (version 2)."""
        prehashed = self._prehashed
        return self.signed if prehashed is None else prehashed[0]

    @property
    def digest(self) -> bytes | None:
        """The SHA-256 of ``signed`` for a prehashed frame (computed once, on first use); None for version 1."""
        prehashed = self._prehashed
        return None if prehashed is None else prehashed[1]


def frame_prefix(magic: bytes, record: bytes, *, version: int = FRAME_V1) -> bytes:
    """Magic, version and the length-prefixed record: the start of every frame."""
    if len(record) > MAX_HEADER_BYTES:
        raise ValueError(f"record of {len(record)} bytes exceeds {MAX_HEADER_BYTES}")
    if version not in FRAME_VERSIONS:
        raise ValueError(f"frame version {version!r} is not one of {sorted(FRAME_VERSIONS)}")
    return magic + pack_u8(version) + pack_u16(len(record)) + record


def prehash_message(signed: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """(what a version-2 signature covers, the SHA-256 of ``signed``)."""
    digest = hashlib.sha256(signed).digest()
    return PREHASH_CONTEXT + digest, digest


def sign_frame(unsigned: bytes, signer_key: Ed25519PrivateKey) -> bytes:
    """Append the signature over ``unsigned`` (a prefix plus body), as its version byte says."""
    if not isinstance(signer_key, Ed25519PrivateKey):
        raise TypeError("signer_key must be an Ed25519PrivateKey")
    if len(unsigned) < 5 or unsigned[4] not in FRAME_VERSIONS:
        raise ValueError("unsigned must start with a frame prefix")
    message = unsigned if unsigned[4] == FRAME_V1 else prehash_message(unsigned)[0]
    return unsigned + signer_key.sign(message)


def split_frame(blob: bytes | bytearray | memoryview, *, magic: bytes, what: str, min_body: int, max_bytes: int,
                versions: frozenset[int] = _V1_ONLY) -> Frame:
    """Parse the frame structure; MalformedMessageError for anything off, a version not in ``versions`` included.

    No signature is checked and nothing is hashed here.
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise MalformedMessageError(f"{what}: expected bytes, got {type(blob).__name__}")
    if len(blob) > max_bytes:
        raise MalformedMessageError(f"{what}: {len(blob)} bytes exceeds the limit of {max_bytes}")
    reader = ByteReader(blob, what=what)
    reader.expect(magic, "magic")
    if (version := reader.u8("version")) not in versions:
        raise MalformedMessageError(f"{what}: unsupported frame version {version} (accepted: "
                                    f"{', '.join(str(v) for v in sorted(versions))})")
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
    return Frame(version=version, record=record, body=body, signed=view[: len(view) - SIGNATURE_BYTES], signature=signature)


def verify_frame(frame: Frame, keys: Iterable[Ed25519PublicKey]) -> str:
    """The key id of the first key whose signature checks out; AuthenticationError if none does."""
    for key in keys:
        try:
            key.verify(frame.signature, frame.message)
        except InvalidSignature:
            continue
        return key_id(key)
    raise AuthenticationError()
