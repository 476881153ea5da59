"""What the aggregators hand back: the fate of one message, and a snapshot of the round.

Rejections are data: every message an aggregator is given ends as a
:class:`HandledUpdate` that says whether it counts and, if not, why. The
reason codes are those of :class:`~device_agent.protocol.validation.RejectReason`
plus the intake's own (:class:`IntakeReason`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from device_agent.protocol.headers import UpdateHeader
from sdk.aggregator.round_state import CloseReason, RoundStatus


class IntakeReason(str, Enum):
    """Rejection reasons the intake adds to the validator's.

    ``auth``: the message did not authenticate (unknown sender, bad signature,
    wrong recipient, AEAD failure, or a sender other than the topic's);
    deliberately says nothing more. ``malformed``: not a well-formed sealed
    update. ``no_round``: no round has started. ``already_counted``: the sender
    already has another update accepted for this round (one per sender and round).
    ``device_overlap`` (root only): the aggregate counts a device another region
    already has counted in this round.
    """

    AUTH = "auth"
    MALFORMED = "malformed"
    NO_ROUND = "no_round"
    ALREADY_COUNTED = "already_counted"
    DEVICE_OVERLAP = "device_overlap"


class Verdict(str, Enum):
    """``accepted``: counted now; ``duplicate``: already counted, acknowledged again; ``rejected``: not counted."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass(frozen=True, kw_only=True)
class HandledUpdate:
    """The fate of one sealed update (or aggregate).

    ``reason`` is empty unless rejected. ``detail`` is a human-readable
    explanation for logs; it is empty for ``auth`` so that nothing reveals
    which check failed. ``receipt`` is the signed receipt to send back, None
    when the message did not authenticate (answering it would let anyone make
    the aggregator sign things). ``header`` is None in that case too.
    ``delta``: the update's tensors when accepted now, else None.
    """

    verdict: Verdict
    reason: str = ""
    detail: str = ""
    receipt: bytes | None = None
    header: UpdateHeader | None = None
    delta: Mapping[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def accepted(self) -> bool:
        """True when the update counts (accepted now, or a duplicate of one that was)."""
        return self.verdict is not Verdict.REJECTED


@dataclass(frozen=True, kw_only=True)
class AggregatorStatus:
    """A snapshot of an aggregator.

    ``round``/``status`` are None before the first round. ``accepted`` and
    ``samples`` count the current round over every process sharing the store.
    ``close_reason`` is why the round should close now (None: keep
    collecting, or already closed). ``counters``: ``rejected:<reason>``,
    ``duplicate``, ``model_rejected:<reason>``, ``abandoned_updates``.
    """

    round: int | None
    status: RoundStatus | None
    accepted: int
    samples: int
    close_reason: CloseReason | None
    counters: Mapping[str, int] = field(default_factory=dict)

    def rejections(self) -> dict[str, int]:
        """Rejected updates by reason (``rejected:<reason>`` counters without the prefix)."""
        prefix = "rejected:"
        return {name[len(prefix) :]: n for name, n in self.counters.items() if name.startswith(prefix)}
