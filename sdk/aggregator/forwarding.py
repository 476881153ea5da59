"""A region's side of the region -> root leg: the root's signed answer to the region's aggregate.

The same holds on every link of a deeper tree (a cell -> its middle tier, a
middle tier -> its parent): "root" below reads "the tier above".

The region closes a round, stores the sealed aggregate (with its nonce) in the
close transaction and resends it until the root answers with a signed receipt
on ``region/<region>/down/receipt``. :func:`settle_forward` verifies such a
receipt against the root's key and, when it names the stored aggregate of the
current closed round, records it in the same store (the first answer stands;
another member of the region may record it too). ``accepted`` ends the
resending; a rejection (``stale_round``: the root had moved on;
``device_overlap``: a device was already counted by another region) ends it
as well, counted and logged as an error, because resending cannot change it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.errors import AuthenticationError, MalformedMessageError
from device_agent.protocol.receipts import ReceiptStatus, open_receipt
from sdk.aggregator.ledger import CounterLedger
from sdk.aggregator.records import ForwardOutcome

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ForwardAnswer:
    """What a root receipt meant for this region: ``round`` and ``status`` (``accepted`` or
    ``rejected:<reason>``) when it answered the stored aggregate, else ``status`` ``ignored`` and why."""

    status: str
    round: int | None = None
    detail: str = ""

    @property
    def settled(self) -> bool:
        """True when the receipt answered the current aggregate (resending can stop)."""
        return self.status != "ignored"


def settle_forward(ledger: CounterLedger, blob: bytes | bytearray | memoryview, *, root_verify_key: Ed25519PublicKey,
                   fleet: str, region: str) -> ForwardAnswer:
    """Record the root's receipt ``blob`` for ``region``'s stored aggregate; never raises for bad input.

    Counted as ``aggregate_acknowledged`` / ``aggregate_rejected:<reason>`` when
    stored, ``root_receipt_ignored:<why>`` (``auth``, ``malformed``, ``scope``,
    ``not_current``) otherwise.
    """
    try:
        receipt = open_receipt(blob, trusted_signers=root_verify_key)
    except AuthenticationError:
        return _ignore(ledger, "auth", "not signed by the root")
    except MalformedMessageError as exc:
        return _ignore(ledger, "malformed", str(exc))
    if (receipt.fleet, receipt.device) != (fleet, region):
        return _ignore(ledger, "scope", f"a receipt for {receipt.fleet}/{receipt.device}")
    record = ledger.store.load_round()
    closing = None if record is None else record.closing
    if record is None or closing is None or closing.result_nonce != receipt.update_nonce or record.round != receipt.round:
        return _ignore(ledger, "not_current", f"round {receipt.round}, nonce {receipt.update_nonce.hex()[:12]}")
    accepted = receipt.status is ReceiptStatus.ACCEPTED
    status = "accepted" if accepted else f"rejected:{receipt.reason}"
    with ledger.write_transaction():
        stored = ledger.store.record_forward(record.round, receipt.update_nonce, ForwardOutcome(status=status, receipt=bytes(blob)))
        if stored:
            ledger.count("aggregate_acknowledged" if accepted else f"aggregate_{status}")
    if stored and accepted:
        logger.info("round %d: the root acknowledged the aggregate", record.round)
    elif stored:
        logger.error("round %d: the root refused the aggregate (%s): its %d updates do not reach the global model",
                     record.round, receipt.reason, closing.update_count)
    return ForwardAnswer(status=status, round=record.round)


def _ignore(ledger: CounterLedger, why: str, detail: str) -> ForwardAnswer:
    ledger.count(f"root_receipt_ignored:{why}")
    logger.info("ignored a root receipt (%s): %s", why, detail)
    return ForwardAnswer(status="ignored", detail=f"{why}: {detail}")
