"""The round state machine of one aggregator tier: pure data, no clock of its own, no I/O.

A round is ``collecting`` from the moment it starts until it is closed, then
``closed`` until the next round starts (a new :class:`RoundState`)::

    start_round(r) --> collecting --(quorum reached, or deadline passed with
                                     at least min_updates)--> closed

While collecting, an update for round ``r`` is admitted (its weight is its
sample count, so a straggler's partial work counts in proportion to what it
did); an update for an older round, or for ``r`` once it is closed, is
``stale_round``; one for a newer round is ``future_round``. Time comes in as
an argument (``now``, read from an injected monotonic clock), so deadlines
are tested without waiting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum

from device_agent.errors import RejectedUpdateError
from device_agent.protocol.validation import RejectReason
from sdk.aggregator.errors import RoundStateError


class RoundStatus(str, Enum):
    """Whether a round still takes updates."""

    COLLECTING = "collecting"
    CLOSED = "closed"


class CloseReason(str, Enum):
    """Why a round may close now."""

    QUORUM = "quorum"
    DEADLINE = "deadline"


@dataclass(frozen=True, kw_only=True)
class RoundPolicy:
    """When a round closes.

    ``quorum``: close as soon as this many updates are accepted.
    ``deadline_s``: once this long has passed since the round opened, close
    with whatever was accepted, provided it is at least ``min_updates``
    (with ``min_updates`` >= 1 a round never closes empty on its own: past the
    deadline it closes at the ``min_updates``-th update; with 0 it closes at the
    deadline whatever arrived, the root's rule).
    """

    quorum: int
    deadline_s: float
    min_updates: int = 1

    def __post_init__(self) -> None:
        for name, low in (("quorum", 1), ("min_updates", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.min_updates > self.quorum:
            raise ValueError(f"min_updates ({self.min_updates}) cannot exceed quorum ({self.quorum})")
        if isinstance(self.deadline_s, bool) or not isinstance(self.deadline_s, (int, float)):
            raise TypeError(f"deadline_s must be a number, got {type(self.deadline_s).__name__}")
        if not (math.isfinite(self.deadline_s) and self.deadline_s > 0):
            raise ValueError(f"deadline_s must be positive and finite, got {self.deadline_s}")


@dataclass(frozen=True, kw_only=True)
class RoundState:
    """One round as seen by one aggregator process.

    ``opened_at`` is a reading of the monotonic clock when this process
    learnt of the round (after a restart: when it reopened the store, so a
    restart can extend a round but never cut it short). ``accepted`` and
    ``samples`` count every accepted update of the round, across all the
    processes sharing the store.
    """

    round: int
    status: RoundStatus
    policy: RoundPolicy
    opened_at: float
    accepted: int = 0
    samples: int = 0

    @classmethod
    def open(cls, *, round: int, policy: RoundPolicy, now: float) -> RoundState:
        """A fresh collecting round opened at ``now``."""
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        return cls(round=round, status=RoundStatus.COLLECTING, policy=policy, opened_at=now)

    @property
    def deadline(self) -> float:
        """The monotonic time after which the round may close below quorum."""
        return self.opened_at + self.policy.deadline_s

    def check_admission(self, update_round: int) -> None:
        """RejectedUpdateError ``stale_round``/``future_round`` unless an update for ``update_round`` may be counted now."""
        if update_round > self.round:
            raise RejectedUpdateError(RejectReason.FUTURE_ROUND.value, f"round {update_round} has not started (current {self.round})")
        if update_round < self.round:
            raise RejectedUpdateError(RejectReason.STALE_ROUND.value, f"round {update_round} is over (current {self.round})")
        if self.status is RoundStatus.CLOSED:
            raise RejectedUpdateError(RejectReason.STALE_ROUND.value, f"round {update_round} is closed")

    def with_totals(self, *, accepted: int, samples: int) -> RoundState:
        """This round with the store's current totals (all processes together)."""
        return replace(self, accepted=accepted, samples=samples)

    def closed(self) -> RoundState:
        """This round, closed; RoundStateError if it already is."""
        if self.status is RoundStatus.CLOSED:
            raise RoundStateError(f"round {self.round} is already closed")
        return replace(self, status=RoundStatus.CLOSED)

    def close_reason(self, now: float) -> CloseReason | None:
        """Why the round should close at ``now``; None while it should keep collecting (or is closed)."""
        if self.status is not RoundStatus.COLLECTING:
            return None
        if self.accepted >= self.policy.quorum:
            return CloseReason.QUORUM
        if now >= self.deadline and self.accepted >= self.policy.min_updates:
            return CloseReason.DEADLINE
        return None

    def should_close(self, now: float) -> bool:
        """True when the round is collecting and has reached quorum, or its deadline with ``min_updates``."""
        return self.close_reason(now) is not None
