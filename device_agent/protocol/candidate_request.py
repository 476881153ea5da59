"""FedFomo candidate requests: a device asks its region for up to ``k`` peers' models.

Layout (the signed frame of every fedge message, no body)::

    b"FDGQ" | version u8 | record_len u16 | request (canonical JSON) | Ed25519 signature 64

The device signs with its identity key. ``reply_key`` is a fresh X25519
public key: the region seals the answer to it (:func:`~device_agent.protocol.envelope.seal_candidates`),
so only the device that made the request can read the peers' models.
:func:`open_candidate_request` is the one parser: size, structure, ids,
``k``, the signature (unknown device or bad signature: the opaque
:class:`~device_agent.errors.AuthenticationError`), then fleet and region.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.errors import MalformedMessageError
from device_agent.protocol._frame import SIGNATURE_BYTES, frame_prefix, sign_frame, split_frame, verify_frame
from device_agent.protocol.envelope import SenderKeys, lookup_sender
from device_agent.protocol.headers import (
    MAX_CANDIDATES,
    MAX_HEADER_BYTES,
    NONCE_BYTES,
    PROTOCOL_VERSION,
    CanonicalRecord,
    check_id,
    check_int,
    check_nonce,
    check_peer_ids,
    check_protocol,
)

REQUEST_MAGIC = b"FDGQ"
REPLY_KEY_BYTES = 32
MAX_REQUEST_BYTES = 7 + MAX_HEADER_BYTES + SIGNATURE_BYTES


@dataclass(frozen=True, kw_only=True)
class CandidateRequest(CanonicalRecord):
    """Device ``device`` asks for up to ``k`` (1..32) peers' models of ``round``.

    ``prefer``: peer ids to serve first (at most ``k``; empty: any peers).
    ``reply_key``: the raw X25519 public key to seal the answer to.
    ``nonce``: 16 random bytes naming the request; the answer repeats it.
    """

    _HEX_FIELDS: ClassVar[frozenset[str]] = frozenset({"reply_key", "nonce"})
    _WHAT: ClassVar[str] = "candidate request"

    protocol: int = PROTOCOL_VERSION
    fleet: str
    region: str
    device: str
    round: int
    k: int
    prefer: tuple[str, ...] = ()
    reply_key: bytes
    nonce: bytes
    timestamp_ms: int

    def __post_init__(self) -> None:
        check_protocol(self.protocol)
        check_id("fleet", self.fleet)
        check_id("region", self.region)
        check_id("device", self.device)
        check_int("round", self.round)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= MAX_CANDIDATES:
            raise ValueError(f"k must be an integer in 1..{MAX_CANDIDATES}, got {self.k!r}")
        object.__setattr__(self, "prefer", check_peer_ids("prefer", self.prefer, limit=self.k))
        if not isinstance(self.reply_key, bytes) or len(self.reply_key) != REPLY_KEY_BYTES:
            raise ValueError(f"reply_key must be {REPLY_KEY_BYTES} bytes")
        check_nonce("nonce", self.nonce)
        check_int("timestamp_ms", self.timestamp_ms)

    @classmethod
    def create(
        cls,
        *,
        fleet: str,
        region: str,
        device: str,
        round: int,
        k: int,
        reply_key: bytes,
        prefer: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> CandidateRequest:
        """A request with a fresh random nonce and the current time."""
        return cls(fleet=fleet, region=region, device=device, round=round, k=k, prefer=tuple(prefer),
                   reply_key=reply_key, nonce=random_bytes(NONCE_BYTES), timestamp_ms=int(clock() * 1000))


def sign_candidate_request(request: CandidateRequest, *, signer_key: Ed25519PrivateKey) -> bytes:
    """The signed wire form of ``request`` (signed with the device's identity key)."""
    if not isinstance(request, CandidateRequest):
        raise TypeError("request must be a CandidateRequest")
    return sign_frame(frame_prefix(REQUEST_MAGIC, request.to_bytes()), signer_key)


def open_candidate_request(
    blob: bytes | bytearray | memoryview,
    *,
    device_keys: SenderKeys,
    fleet: str,
    region: str,
) -> CandidateRequest:
    """Parse and verify a request signed by ``request.device`` (looked up in ``device_keys``) for ``fleet``/``region``.

    AuthenticationError: unknown device or bad signature. MalformedMessageError:
    anything structurally wrong, or a request for another fleet or region.
    """
    frame = split_frame(blob, magic=REQUEST_MAGIC, what="candidate request", min_body=0, max_bytes=MAX_REQUEST_BYTES)
    if len(frame.body):
        raise MalformedMessageError(f"candidate request: {len(frame.body)} unexpected bytes after the record")
    request = CandidateRequest.from_bytes(frame.record)
    verify_frame(frame, [lookup_sender(device_keys, request.device)])
    if (request.fleet, request.region) != (fleet, region):
        raise MalformedMessageError(f"candidate request for {request.fleet}/{request.region}, this is {fleet}/{region}")
    return request
