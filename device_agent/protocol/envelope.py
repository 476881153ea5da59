"""Sealed updates (device -> region -> root) and signed models (root -> region -> device).

A sealed update is encrypted to one recipient and signed by its sender::

    b"FDGU" | version u8 | header_len u16 | header | ephemeral X25519 public 32 | ciphertext | Ed25519 signature 64

Construction: ``shared = X25519(ephemeral_private, recipient_public)``;
``key (32) || nonce (12) = HKDF-SHA256(shared, salt=SHA-256(header),
info="fedge-seal-v1" || 0x00 || ephemeral_public || recipient_public)``;
``ciphertext = ChaCha20-Poly1305(key, nonce, plaintext=tensor payload,
aad=every byte before the ciphertext)``; the signature covers every byte
before it: directly (frame version 1) or as ``context || SHA-256`` of them
(version 2, "prehashed": one fast hash instead of Ed25519's SHA-512 over the
payload; the sender seals the highest version its recipient announced).
A fresh ephemeral key per message makes key and nonce unique.
ChaCha20 rather than AES-GCM because the Raspberry Pi 4 has no AES instructions.

A signed model is ``b"FDGM" | version | header_len | header | tensor payload | signature``
(always frame version 1: every device verifies it, and version 1 is what every device reads).

FedFomo candidates (region -> one device) are sealed like an update under
the magic ``b"FDGK"``, to the X25519 key the device put in its request, and
signed by the region; peer ``i``'s tensors travel as ``"<i>/<name>"``.

The opener checks the signature before it decrypts or decodes anything.
Unknown sender, bad signature, wrong recipient and AEAD failure all raise the
same opaque :class:`AuthenticationError`; structural problems raise
:class:`MalformedMessageError` saying what is wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from device_agent.errors import AuthenticationError, MalformedMessageError
from device_agent.keys import TrustedKeys, raw_public_bytes, trusted_key_map
from device_agent.protocol._frame import (
    FRAME_V1,
    FRAME_VERSIONS,
    SIGNATURE_BYTES,
    Frame,
    frame_prefix,
    sign_frame,
    split_frame,
    verify_frame,
)
from device_agent.protocol.headers import MAX_HEADER_BYTES, CandidatesHeader, ModelHeader, UpdateHeader
from device_agent.compression.spec import CompressedTensor
from device_agent.protocol.tensor_codec import DecodeLimits, decode_tensors, encode_tensors

UPDATE_MAGIC = b"FDGU"
MODEL_MAGIC = b"FDGM"
CANDIDATES_MAGIC = b"FDGK"
_KDF_INFO = b"fedge-seal-v1\x00"
_KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_PUBLIC_BYTES = 32
_FRAME_OVERHEAD = 7 + MAX_HEADER_BYTES + _PUBLIC_BYTES + _TAG_BYTES + SIGNATURE_BYTES

#: Who may have sent an update: sender id -> key, or a lookup returning None for "unknown".
SenderKeys = Union[Mapping[str, Ed25519PublicKey], Callable[[str], Union[Ed25519PublicKey, None]]]


@dataclass(frozen=True, kw_only=True)
class OpenedUpdate:
    """An authenticated, decrypted update; ``sender_key_id`` names the key that signed it.

    ``digest`` names the content for exactly-once; None unless asked for. Frame version 1:
    SHA-256 of the header bytes and the decrypted payload bytes as received (equal for a
    re-sealed copy, whose ciphertext differs). Version 2: the SHA-256 the signature covers,
    of every byte before it (equal for a byte-identical resend, which is what fedge's
    senders resend; a re-sealed copy has other bytes and another digest).
    """

    header: UpdateHeader
    tensors: dict[str, np.ndarray]
    sender_key_id: str
    digest: bytes | None = None
    frame_version: int = FRAME_V1


@dataclass(frozen=True, kw_only=True)
class OpenedCandidates:
    """Authenticated, decrypted candidates: ``models[i]`` is the shared model of ``header.peers[i]``."""

    header: CandidatesHeader
    models: tuple[dict[str, np.ndarray], ...]
    signer_key_id: str


@dataclass(frozen=True, kw_only=True)
class OpenedModel:
    """An authenticated model; ``signer_key_id`` names the trusted key that signed it."""

    header: ModelHeader
    tensors: dict[str, np.ndarray]
    signer_key_id: str


def _cipher(shared: bytes, header: bytes, ephemeral_public: bytes, recipient_public: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    okm = HKDF(
        algorithm=SHA256(),
        length=_KEY_BYTES + _NONCE_BYTES,
        salt=hashlib.sha256(header).digest(),
        info=_KDF_INFO + ephemeral_public + recipient_public,
    ).derive(shared)
    return ChaCha20Poly1305(okm[:_KEY_BYTES]), okm[_KEY_BYTES:]


def seal_update(
    header: UpdateHeader,
    tensors: Mapping[str, np.ndarray | CompressedTensor],
    *,
    recipient_public_key: X25519PublicKey,
    sender_key: Ed25519PrivateKey,
    ephemeral_key: X25519PrivateKey | None = None,
    frame_version: int = FRAME_V1,
) -> bytes:
    """Encode ``tensors`` with ``header.encoding``, encrypt them to the recipient and sign.

    A compressed encoding takes the :class:`CompressedTensor` values ``compress_delta`` made.
    ``frame_version``: 1, or 2 (prehashed) when the recipient announced it reads it
    (:func:`device_agent.protocol.frame_versions.choose_frame_version`).

    ``ephemeral_key`` None means a fresh random key (always, outside known-answer tests).
    """
    if not isinstance(header, UpdateHeader):
        raise TypeError("header must be an UpdateHeader")
    return _seal(UPDATE_MAGIC, header.to_bytes(), encode_tensors(tensors, encoding=header.encoding),
                 recipient_public_key=recipient_public_key, sender_key=sender_key, ephemeral_key=ephemeral_key,
                 version=frame_version)


def _seal(
    magic: bytes,
    record: bytes,
    payload: bytes,
    *,
    recipient_public_key: X25519PublicKey,
    sender_key: Ed25519PrivateKey,
    ephemeral_key: X25519PrivateKey | None,
    version: int = FRAME_V1,
) -> bytes:
    if not isinstance(recipient_public_key, X25519PublicKey):
        raise TypeError("recipient_public_key must be an X25519PublicKey")
    ephemeral = X25519PrivateKey.generate() if ephemeral_key is None else ephemeral_key
    ephemeral_public = raw_public_bytes(ephemeral.public_key())
    aad = frame_prefix(magic, record, version=version) + ephemeral_public
    cipher, nonce = _cipher(ephemeral.exchange(recipient_public_key), record, ephemeral_public, raw_public_bytes(recipient_public_key))
    return sign_frame(aad + cipher.encrypt(nonce, payload, aad), sender_key)


def _decrypt(frame: Frame, recipient_key: X25519PrivateKey) -> bytes:
    """The plaintext of an authenticated sealed frame; AuthenticationError when it was not sealed to ``recipient_key``."""
    ephemeral_public = bytes(frame.body[:_PUBLIC_BYTES])
    try:
        shared = recipient_key.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    except ValueError as exc:  # low-order point: all-zero shared secret
        raise AuthenticationError() from exc
    recipient_public = raw_public_bytes(recipient_key.public_key())
    cipher, nonce = _cipher(shared, frame.record, ephemeral_public, recipient_public)
    aad = frame.signed[: len(frame.signed) - len(frame.body) + _PUBLIC_BYTES]
    try:  # views of the received bytes: no copy of the ciphertext
        return cipher.decrypt(nonce, frame.body[_PUBLIC_BYTES:], aad)
    except InvalidTag as exc:
        raise AuthenticationError() from exc


def lookup_sender(sender_public_key: SenderKeys, sender: str) -> Ed25519PublicKey:
    """The Ed25519 key of ``sender``; AuthenticationError when unknown (opaque, like a bad signature)."""
    try:
        key = sender_public_key.get(sender) if isinstance(sender_public_key, Mapping) else sender_public_key(sender)
    except KeyError as exc:
        raise AuthenticationError() from exc
    if not isinstance(key, Ed25519PublicKey):
        raise AuthenticationError()
    return key


def open_update(
    blob: bytes | bytearray | memoryview,
    *,
    recipient_key: X25519PrivateKey,
    sender_public_key: SenderKeys,
    limits: DecodeLimits = DecodeLimits(),
    with_digest: bool = False,
    frame_versions: frozenset[int] = FRAME_VERSIONS,
) -> OpenedUpdate:
    """Authenticate, decrypt and decode a sealed update.

    ``sender_public_key`` maps ``header.sender`` to its Ed25519 key (a lookup
    may return None: unknown sender). The header is parsed before the
    signature is checked only to find the sender; nothing is decrypted or
    decoded until the signature verifies. ``with_digest``: also give the
    content digest (:attr:`OpenedUpdate.digest`): free for a prehashed frame
    (the signature's own SHA-256), a hash of header and plaintext for version 1,
    never a re-encoding. ``frame_versions``: the frame versions to accept (another
    is MalformedMessageError naming it).
    """
    if not isinstance(recipient_key, X25519PrivateKey):
        raise TypeError("recipient_key must be an X25519PrivateKey")
    frame = split_frame(blob, magic=UPDATE_MAGIC, what="sealed update", min_body=_PUBLIC_BYTES + _TAG_BYTES,
                        max_bytes=limits.max_encoded_bytes + _FRAME_OVERHEAD, versions=frame_versions)
    header = UpdateHeader.from_bytes(frame.record)
    key_id = verify_frame(frame, [lookup_sender(sender_public_key, header.sender)])
    plaintext = _decrypt(frame, recipient_key)
    tensors = decode_tensors(plaintext, encoding=header.encoding, limits=limits)
    digest = frame.digest
    if with_digest and digest is None:
        hasher = hashlib.sha256(frame.record)
        hasher.update(plaintext)
        digest = hasher.digest()
    return OpenedUpdate(header=header, tensors=tensors, sender_key_id=key_id, digest=digest if with_digest else None,
                        frame_version=frame.version)


def sign_model(header: ModelHeader, tensors: Mapping[str, np.ndarray], *, signer_key: Ed25519PrivateKey) -> bytes:
    """Encode ``tensors`` with ``header.encoding`` and sign header and payload (no encryption)."""
    if not isinstance(header, ModelHeader):
        raise TypeError("header must be a ModelHeader")
    unsigned = frame_prefix(MODEL_MAGIC, header.to_bytes()) + encode_tensors(tensors, encoding=header.encoding)
    return sign_frame(unsigned, signer_key)


def open_model(
    blob: bytes | bytearray | memoryview,
    *,
    trusted_signers: TrustedKeys,
    limits: DecodeLimits = DecodeLimits(),
) -> OpenedModel:
    """Verify a signed model against any of ``trusted_signers`` (root and region keys) and decode it."""
    keys = trusted_key_map(trusted_signers)
    if not keys:
        raise ValueError("no trusted signer key given")
    frame = split_frame(blob, magic=MODEL_MAGIC, what="signed model", min_body=0, max_bytes=limits.max_encoded_bytes + _FRAME_OVERHEAD)
    header = ModelHeader.from_bytes(frame.record)
    key_id = verify_frame(frame, keys.values())
    tensors = decode_tensors(frame.body, encoding=header.encoding, limits=limits)
    return OpenedModel(header=header, tensors=tensors, signer_key_id=key_id)


def verified_model_header(blob: bytes | bytearray | memoryview, *, trusted_signers: TrustedKeys) -> ModelHeader:
    """The header of a signed model, after its signature checked out, without decoding the tensors.

    For a reader that must know whom and which bundle version a model is for
    before it decodes it (a device on another bundle version than its region's
    models). AuthenticationError / MalformedMessageError as :func:`open_model`.
    """
    keys = trusted_key_map(trusted_signers)
    if not keys:
        raise ValueError("no trusted signer key given")
    frame = split_frame(blob, magic=MODEL_MAGIC, what="signed model", min_body=0, max_bytes=len(blob))
    header = ModelHeader.from_bytes(frame.record)
    verify_frame(frame, keys.values())
    return header


def seal_candidates(
    header: CandidatesHeader,
    models: Sequence[Mapping[str, np.ndarray]],
    *,
    recipient_public_key: X25519PublicKey,
    signer_key: Ed25519PrivateKey,
) -> bytes:
    """Seal ``models`` (one per ``header.peers`` entry) to the requesting device's key and sign as the region."""
    if not isinstance(header, CandidatesHeader):
        raise TypeError("header must be a CandidatesHeader")
    if len(models) != len(header.peers):
        raise ValueError(f"{len(header.peers)} peers but {len(models)} models")
    flat = {f"{i}/{name}": value for i, model in enumerate(models) for name, value in model.items()}
    return _seal(CANDIDATES_MAGIC, header.to_bytes(), encode_tensors(flat, encoding=header.encoding),
                 recipient_public_key=recipient_public_key, sender_key=signer_key, ephemeral_key=None)


def open_candidates(
    blob: bytes | bytearray | memoryview,
    *,
    recipient_key: X25519PrivateKey,
    trusted_signers: TrustedKeys,
    limits: DecodeLimits = DecodeLimits(),
) -> OpenedCandidates:
    """Verify sealed candidates against ``trusted_signers`` (the region keys), decrypt and split them per peer.

    Every peer must have at least one tensor and no tensor may name another
    index (MalformedMessageError); names and shapes against the bundle are the caller's check.
    """
    if not isinstance(recipient_key, X25519PrivateKey):
        raise TypeError("recipient_key must be an X25519PrivateKey")
    keys = trusted_key_map(trusted_signers)
    if not keys:
        raise ValueError("no trusted signer key given")
    frame = split_frame(blob, magic=CANDIDATES_MAGIC, what="sealed candidates", min_body=_PUBLIC_BYTES + _TAG_BYTES,
                        max_bytes=limits.max_encoded_bytes + _FRAME_OVERHEAD)
    header = CandidatesHeader.from_bytes(frame.record)
    key_id = verify_frame(frame, keys.values())
    flat = decode_tensors(_decrypt(frame, recipient_key), encoding=header.encoding, limits=limits)
    models: list[dict[str, np.ndarray]] = [{} for _ in header.peers]
    for name, value in flat.items():
        index, _, param = name.partition("/")
        if not (index.isascii() and index.isdigit() and str(int(index)) == index and int(index) < len(models) and param):
            raise MalformedMessageError(f"sealed candidates: tensor {name!r} names no peer of the header")
        models[int(index)][param] = value
    if any(not model for model in models):
        raise MalformedMessageError("sealed candidates: a peer of the header has no tensors")
    return OpenedCandidates(header=header, models=tuple(models), signer_key_id=key_id)


def claimed_update_header(blob: bytes | bytearray | memoryview) -> UpdateHeader | None:
    """The header a sealed update *claims*, unauthenticated, or None when even that does not parse.

    For logs only (which device an update that failed authentication says it
    is from): never act on it.
    """
    try:
        frame = split_frame(blob, magic=UPDATE_MAGIC, what="sealed update", min_body=0, max_bytes=len(blob) + 1,
                            versions=FRAME_VERSIONS)
        return UpdateHeader.from_bytes(frame.record)
    except MalformedMessageError:
        return None
