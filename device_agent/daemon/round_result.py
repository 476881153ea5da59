"""How a round ended for the device: :class:`RoundStatus`, :class:`RoundResult`, :class:`RunResult` (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from device_agent.protocol.receipts import Receipt, ReceiptStatus
from device_agent.protocol.validation import RejectReason
from device_agent.trainer import TrainReport


class RoundStatus(str, Enum):
    """How a round ended for the device.

    ``duplicate``: a resend was answered ``replay``, which the aggregator says
    only for a nonce it already counted, so an earlier copy was accepted.
    ``stale``: answered ``stale_round``: the aggregator had already moved on to
    a later round (docs/protocol.md, "Rounds, resends and replays"). The update
    may have been counted before its receipt was lost; either way the round is
    over for the device, which drops it and takes the next model.
    ``no_receipt``: nothing answered; the update stays pending and is resent.
    ``refused``: the update could not be published (over the broker limit with chunking off).
    ``failed``: local training failed (unreadable data, non-finite loss); the round is skipped.
    ``wrong_version``: answered ``wrong_bundle_version``: the region runs another bundle version
    (a switch at a round boundary); the round is over and the device looks for a release at once.
    """

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    STALE = "stale"
    REJECTED = "rejected"
    NO_RECEIPT = "no_receipt"
    REFUSED = "refused"
    FAILED = "failed"
    WRONG_VERSION = "wrong_version"


_BY_REASON = {
    RejectReason.REPLAY.value: RoundStatus.DUPLICATE,
    RejectReason.STALE_ROUND.value: RoundStatus.STALE,
    RejectReason.WRONG_BUNDLE_VERSION.value: RoundStatus.WRONG_VERSION,
}


def status_for_receipt(receipt: Receipt) -> RoundStatus:
    """The round's status named by its receipt: accepted, or what the rejection's reason means."""
    if receipt.status is ReceiptStatus.ACCEPTED:
        return RoundStatus.ACCEPTED
    return _BY_REASON.get(receipt.reason, RoundStatus.REJECTED)


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    """One attempt at one round. ``trained`` False: a pending or saved update was sent instead.

    ``reason``: the aggregator's reason code (rejected) or why nothing was sent (refused, failed), else empty.
    ``report`` None when nothing was trained; ``receipt`` None when none came.
    """

    round: int
    status: RoundStatus
    trained: bool
    reason: str = ""
    report: TrainReport | None = None
    receipt: Receipt | None = None


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """What :meth:`DeviceAgent.run` did; ``stopped`` True when its stop event ended it."""

    rounds: tuple[RoundResult, ...]
    stopped: bool

    @property
    def finished(self) -> int:
        """Rounds that ended (any status but ``no_receipt``)."""
        return sum(r.status is not RoundStatus.NO_RECEIPT for r in self.rounds)
