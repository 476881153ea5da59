"""Signed model deltas (``FDGD``): a model going down as what to add to the previous one.

Same frame as a signed model (``FDGM``), another magic so that neither
signature ever verifies as the other::

    "FDGD" | version u8 | header_len u16 | ModelDeltaHeader | tensor payload | Ed25519 signature 64

The payload is a compressed tensor payload (any encoding) that decodes to
dense float32; :func:`model_digest` names the model a delta starts from and
the one it makes. Applying one is :func:`device_agent.compression.downlink.apply_model_delta`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.compression.spec import CompressedTensor
from device_agent.keys import TrustedKeys, trusted_key_map
from device_agent.protocol._frame import SIGNATURE_BYTES, frame_prefix, sign_frame, split_frame, verify_frame
from device_agent.protocol.headers import MAX_HEADER_BYTES, ModelDeltaHeader
from device_agent.protocol.tensor_codec import DecodeLimits, decode_tensors, encode_tensors

DELTA_MAGIC = b"FDGD"
_FRAME_OVERHEAD = 7 + MAX_HEADER_BYTES + SIGNATURE_BYTES


def model_digest(tensors: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 of the model's raw tensor payload (names sorted, little-endian float32): one value per model."""
    return hashlib.sha256(encode_tensors(tensors)).digest()


@dataclass(frozen=True, kw_only=True)
class OpenedModelDelta:
    """An authenticated model delta, decoded to dense arrays; ``signer_key_id`` names the key that signed it."""

    header: ModelDeltaHeader
    tensors: dict[str, np.ndarray]
    signer_key_id: str


def sign_model_delta(header: ModelDeltaHeader, tensors: Mapping[str, np.ndarray | CompressedTensor], *,
                     signer_key: Ed25519PrivateKey) -> bytes:
    """Encode ``tensors`` with ``header.encoding`` and sign header and payload (no encryption: every device reads it)."""
    if not isinstance(header, ModelDeltaHeader):
        raise TypeError("header must be a ModelDeltaHeader")
    unsigned = frame_prefix(DELTA_MAGIC, header.to_bytes()) + encode_tensors(tensors, encoding=header.encoding)
    return sign_frame(unsigned, signer_key)


def open_model_delta(blob: bytes | bytearray | memoryview, *, trusted_signers: TrustedKeys,
                     limits: DecodeLimits = DecodeLimits()) -> OpenedModelDelta:
    """Verify a signed delta against any of ``trusted_signers``, then decode it (nothing is decoded before the
    signature checks out). AuthenticationError / MalformedMessageError as :func:`~device_agent.protocol.envelope.open_model`."""
    keys = trusted_key_map(trusted_signers)
    if not keys:
        raise ValueError("no trusted signer key given")
    frame = split_frame(blob, magic=DELTA_MAGIC, what="signed model delta", min_body=0,
                        max_bytes=limits.max_encoded_bytes + _FRAME_OVERHEAD)
    header = ModelDeltaHeader.from_bytes(frame.record)
    key_id = verify_frame(frame, keys.values())
    tensors = decode_tensors(frame.body, encoding=header.encoding, limits=limits)
    return OpenedModelDelta(header=header, tensors=tensors, signer_key_id=key_id)
