"""Signed receipts: the aggregator's answer to one authentic update.

MQTT cannot tell a device that its update arrived: a publish the broker's ACL
denies still gets PUBACK "success" on v3.1.1 and is dropped. So the regional
aggregator answers every update it authenticated with a receipt naming the
update's nonce, accepted or rejected with a reason code (the
:class:`~device_agent.errors.RejectedUpdateError` reason). Unauthenticated or
malformed messages get no receipt: answering them would let anyone make the
aggregator sign things. A ``wrong_bundle_version`` rejection tells the device
that its region runs another bundle version (a switch at a round boundary,
docs/rollout.md): the agent ends the round and looks for a release at once. Layout::

    b"FDGR" | version u8 | receipt_len u16 | receipt (canonical JSON) | Ed25519 signature 64
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.errors import MalformedMessageError, RejectedUpdateError
from device_agent.keys import TrustedKeys, trusted_key_map
from device_agent.protocol._frame import SIGNATURE_BYTES, frame_prefix, sign_frame, split_frame, verify_frame
from device_agent.protocol.headers import (
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    CanonicalRecord,
    UpdateHeader,
    as_enum,
    check_id,
    check_int,
    check_nonce,
    check_protocol,
)

RECEIPT_MAGIC = b"FDGR"
_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")


class ReceiptStatus(str, Enum):
    """Whether the aggregator counted the update."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass(frozen=True, kw_only=True)
class Receipt(CanonicalRecord):
    """The answer to update ``update_nonce`` of ``device`` for ``round``, issued by aggregator ``issuer``.

    ``reason`` is empty when accepted and a short code (``norm``, ``replay``...) when rejected.
    """

    _HEX_FIELDS: ClassVar[frozenset[str]] = frozenset({"update_nonce"})
    _WHAT: ClassVar[str] = "receipt"

    protocol: int = PROTOCOL_VERSION
    fleet: str
    issuer: str
    device: str
    round: int
    update_nonce: bytes
    status: ReceiptStatus
    reason: str = ""
    timestamp_ms: int

    def __post_init__(self) -> None:
        check_protocol(self.protocol)
        object.__setattr__(self, "status", as_enum("status", ReceiptStatus, self.status))
        check_id("fleet", self.fleet)
        check_id("issuer", self.issuer)
        check_id("device", self.device)
        check_int("round", self.round)
        check_nonce("update_nonce", self.update_nonce)
        check_int("timestamp_ms", self.timestamp_ms)
        if self.status is ReceiptStatus.ACCEPTED and self.reason != "":
            raise ValueError("an accepted receipt carries no reason")
        if self.status is ReceiptStatus.REJECTED and not (isinstance(self.reason, str) and _REASON.fullmatch(self.reason)):
            raise ValueError(f"a rejected receipt needs a reason code matching [a-z][a-z0-9_]{{0,63}}, got {self.reason!r}")

    @classmethod
    def answering(
        cls,
        header: UpdateHeader,
        *,
        issuer: str,
        rejection: RejectedUpdateError | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Receipt:
        """The receipt for ``header``: accepted when ``rejection`` is None, else rejected with its reason."""
        return cls(
            fleet=header.fleet,
            issuer=issuer,
            device=header.sender,
            round=header.round,
            update_nonce=header.nonce,
            status=ReceiptStatus.ACCEPTED if rejection is None else ReceiptStatus.REJECTED,
            reason="" if rejection is None else rejection.reason,
            timestamp_ms=int(clock() * 1000),
        )

    def answers(self, header: UpdateHeader) -> bool:
        """True when this receipt is about the update with ``header`` (fleet, device, round and nonce match)."""
        return (self.fleet, self.device, self.round, self.update_nonce) == (
            header.fleet,
            header.sender,
            header.round,
            header.nonce,
        )


def sign_receipt(receipt: Receipt, *, signer_key: Ed25519PrivateKey) -> bytes:
    """The signed wire form of ``receipt``."""
    if not isinstance(receipt, Receipt):
        raise TypeError("receipt must be a Receipt")
    return sign_frame(frame_prefix(RECEIPT_MAGIC, receipt.to_bytes()), signer_key)


def open_receipt(blob: bytes | bytearray | memoryview, *, trusted_signers: TrustedKeys) -> Receipt:
    """Verify a receipt against the aggregator keys the device trusts and parse it."""
    keys = trusted_key_map(trusted_signers)
    if not keys:
        raise ValueError("no trusted signer key given")
    frame = split_frame(blob, magic=RECEIPT_MAGIC, what="receipt", min_body=0, max_bytes=7 + MAX_HEADER_BYTES + SIGNATURE_BYTES)
    if len(frame.body):
        raise MalformedMessageError(f"receipt: {len(frame.body)} unexpected bytes after the record")
    verify_frame(frame, keys.values())
    return Receipt.from_bytes(frame.record)
