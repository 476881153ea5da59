"""The records the aggregator store reads and writes: plain frozen data, no SQL.

They describe the current round (:class:`RoundRecord`, :class:`ClosedRound`,
:class:`RoundMarker`), one member's running sum (:class:`PartialSum`), one
accepted update (:class:`Acceptance`, :class:`AcceptedKey`) and the replay
window's snapshot (:class:`ReplaySnapshot`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdk.aggregation import WeightedMeanState
from sdk.aggregation.influence import RoundBounds
from sdk.aggregator.round_state import RoundStatus


@dataclass(frozen=True, kw_only=True)
class ClosedRound:
    """What closing a round produced.

    ``mean_delta`` None: nothing was accepted (nothing to forward).
    ``result_params``: the regional model after the round (None at the root).
    ``result_blob``: the sealed aggregate for the tier above (None when there is nothing to forward);
    ``result_nonce``: its header nonce (what the tier above's receipt names).
    """

    mean_delta: dict[str, np.ndarray] | None
    update_count: int
    sample_count: int
    result_params: dict[str, np.ndarray] | None
    result_blob: bytes | None
    result_nonce: bytes | None = None


@dataclass(frozen=True, kw_only=True)
class ForwardOutcome:
    """The tier above's signed answer to a forwarded aggregate: ``status`` ``accepted`` or
    ``rejected:<reason>``, and the receipt bytes as received."""

    status: str
    receipt: bytes


@dataclass(frozen=True, kw_only=True)
class RoundRecord:
    """The stored current round. ``base_params``: the model the round's deltas are relative to.

    ``bounds``: the round's influence bounds (None: none apply, as at the root).
    ``forward``: the answer of the tier above to the closed round's aggregate (None: none yet).
    """

    round: int
    status: RoundStatus
    global_params: dict[str, np.ndarray]
    base_params: dict[str, np.ndarray]
    model_blob: bytes
    closing: ClosedRound | None
    bounds: RoundBounds | None = None
    forward: ForwardOutcome | None = None


@dataclass(frozen=True, kw_only=True)
class RoundMarker:
    """Which round is current and whether it is collecting: cheap to read on every update."""

    round: int
    status: RoundStatus


@dataclass(frozen=True, kw_only=True)
class PartialSum:
    """One member's share of a round: ``state.sums`` is empty for the buffered rules; ``samples`` sums sample counts."""

    state: WeightedMeanState = field(default_factory=WeightedMeanState)
    samples: int = 0


@dataclass(frozen=True, kw_only=True)
class Acceptance:
    """One accepted update: its identity, a digest of its content, what it weighed, its raw L2 norm."""

    sender: str
    round: int
    nonce: bytes
    digest: bytes
    sample_count: int
    weight: float
    norm: float = 0.0


@dataclass(frozen=True, kw_only=True)
class AcceptedKey:
    """What the replay window needs from an ``accepted`` row, in commit order (``seq``)."""

    seq: int
    sender: str
    round: int
    nonce: bytes


@dataclass(frozen=True, kw_only=True)
class ReplaySnapshot:
    """The replay window state (``ReplayWindow.export_state``) including every accepted row up to ``seq``."""

    state: dict[str, Any]
    seq: int
