"""Aggregation rules a regional aggregator picks from its config: mean, median, trimmed mean.

In the manner of Flower's ``Strategy`` (the math lives in pure functions,
the class only sequences it), an :class:`AggregationRule` serves one round
with two verbs: :meth:`~AggregationRule.accumulate` each accepted update as
it arrives, then :meth:`~AggregationRule.finalize` once at quorum or
deadline. Optional norm clipping (:func:`~sdk.aggregation.robust.clip_by_norm`)
is applied to every update before it is folded in.

- ``mean``: FedAvg's sample-weighted mean (McMahan et al., AISTATS 2017),
  streaming, O(model) memory, resumable from :meth:`MeanRule.to_state`.
- ``median`` / ``trimmed_mean``: Yin et al. (ICML 2018), buffered: they keep
  every accepted update of the round, O(n_clients x model) memory, and sort
  per coordinate at :meth:`~AggregationRule.finalize`. Sample counts are
  summed (the root needs them) but do not weight the result. To survive a
  restart the aggregator must store each accepted update and replay it;
  there is no compact state.

Across all rules a zero weight means "counted, contributes nothing", and a
round whose weights sum to 0 finalizes to ``None``: keep the previous global model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from device_agent.parameters import (
    Layout,
    ParameterDict,
    check_positive,
    check_update,
    check_weight,
    layout_from_shapes,
)
from sdk.aggregation.robust import clip_by_norm, coordinate_median, trim_count, trimmed_mean
from sdk.aggregation.weighted_mean import StreamingWeightedMean, WeightedMeanState

RuleName = Literal["mean", "median", "trimmed_mean"]


@dataclass(frozen=True, kw_only=True)
class AggregationConfig:
    """How a regional aggregator combines the updates of one round.

    ``rule``: ``"mean"`` | ``"median"`` | ``"trimmed_mean"``.
    ``trim_fraction``: the fraction cut from each end per coordinate, in
    [0, 0.5); read only by ``trimmed_mean``.
    ``clip_norm``: the global L2 bound applied to each update before
    aggregation; None disables clipping.
    """

    rule: RuleName = "mean"
    trim_fraction: float = 0.1
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in ("mean", "median", "trimmed_mean"):
            raise ValueError(f"rule must be 'mean', 'median' or 'trimmed_mean', got {self.rule!r}")
        trim_count(0, self.trim_fraction)  # validates the range
        if self.clip_norm is not None:
            check_positive(self.clip_norm, what="clip_norm")


class AggregationRule(ABC):
    """One round's aggregation: :meth:`accumulate` accepted updates, then :meth:`finalize`.

    The base class validates each update (weight, layout against the first
    update or ``expected_shapes``, finiteness), clips it when configured,
    keeps the counters, and hands the update to the subclass. Errors are
    ``ValueError``/``TypeError`` and leave the rule unchanged.
    """

    name: ClassVar[RuleName]
    streaming: ClassVar[bool]
    """True when memory stays O(model) whatever the number of updates."""

    def __init__(
        self,
        *,
        clip_norm: float | None = None,
        expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        self._clip_norm = None if clip_norm is None else check_positive(clip_norm, what="clip_norm")
        self._layout: Layout | None = None if expected_shapes is None else layout_from_shapes(expected_shapes)
        self._count = 0
        self._total_weight = 0.0
        self._clipped_count = 0
        self._init_storage()

    @abstractmethod
    def _init_storage(self) -> None:
        """Create the empty per-round storage; ``self._layout`` is already set (or None)."""

    @property
    def count(self) -> int:
        """Updates folded in this round, zero-weight ones included."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights (sample counts) folded in; what the region reports to the root."""
        return self._total_weight

    @property
    def clipped_count(self) -> int:
        """How many updates norm clipping scaled down (0 without clipping)."""
        return self._clipped_count

    def accumulate(self, delta: ParameterDict, weight: float) -> None:
        """Validate, clip when configured, and fold in one accepted update."""
        w = check_weight(weight)
        layout = check_update(self._layout, delta)
        was_clipped = False
        if self._clip_norm is not None:
            clipped = clip_by_norm(delta, self._clip_norm)
            delta, was_clipped = clipped.delta, clipped.clipped
        self._fold(delta, w)
        # Counters change only once the update is in, so an error leaves the rule as it was.
        self._layout = layout
        self._count += 1
        self._total_weight += w
        self._clipped_count += int(was_clipped)

    @abstractmethod
    def _fold(self, delta: ParameterDict, weight: float) -> None:
        """Add one validated (and clipped) update; ``weight`` is >= 0 and finite."""

    @abstractmethod
    def finalize(self) -> dict[str, np.ndarray] | None:
        """The round's aggregate as float32 arrays; None when the weights sum to 0 (keep the previous model)."""


class MeanRule(AggregationRule):
    """Sample-weighted mean (FedAvg), streaming in O(model) memory and resumable."""

    name: ClassVar[RuleName] = "mean"
    streaming: ClassVar[bool] = True

    def _init_storage(self) -> None:
        self._mean = StreamingWeightedMean(expected_shapes=self._layout)

    def _fold(self, delta: ParameterDict, weight: float) -> None:
        self._mean.accumulate(delta, weight)

    def finalize(self) -> dict[str, np.ndarray] | None:
        return self._mean.finalize()

    def to_state(self) -> WeightedMeanState:
        """The running sum as plain data, for durable storage (see :class:`WeightedMeanState`)."""
        return self._mean.to_state()

    @classmethod
    def from_state(cls, state: WeightedMeanState, *, clip_norm: float | None = None) -> MeanRule:
        """Resume a round from :meth:`to_state` output; ``clipped_count`` restarts at 0."""
        rule = cls(clip_norm=clip_norm)
        rule._mean = StreamingWeightedMean.from_state(state)
        rule._layout = rule._mean.layout
        rule._count = rule._mean.count
        rule._total_weight = rule._mean.total_weight
        return rule


class _BufferedRule(AggregationRule):
    """Keeps every positive-weight update of the round; reduces them at :meth:`finalize`."""

    streaming: ClassVar[bool] = False

    def _init_storage(self) -> None:
        self._buffer: list[dict[str, np.ndarray]] = []

    def _fold(self, delta: ParameterDict, weight: float) -> None:
        # Zero weight contributes nothing here too, so all rules agree on its meaning.
        if weight > 0.0:
            self._buffer.append({name: np.array(value, dtype=np.float32) for name, value in delta.items()})

    def finalize(self) -> dict[str, np.ndarray] | None:
        if not self._buffer:
            return None
        return self._reduce(self._buffer)

    @abstractmethod
    def _reduce(self, updates: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None: ...


class MedianRule(_BufferedRule):
    """Coordinate-wise median; weights ignored; O(n_clients x model) memory."""

    name: ClassVar[RuleName] = "median"

    def _reduce(self, updates: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
        return coordinate_median(updates)


class TrimmedMeanRule(_BufferedRule):
    """Coordinate-wise trimmed mean; weights ignored; O(n_clients x model) memory.

    With few updates ``floor(trim_fraction * n)`` may be 0, and the result is then the plain mean.
    """

    name: ClassVar[RuleName] = "trimmed_mean"

    def __init__(
        self,
        *,
        trim_fraction: float = 0.1,
        clip_norm: float | None = None,
        expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        trim_count(0, trim_fraction)
        super().__init__(clip_norm=clip_norm, expected_shapes=expected_shapes)
        self._trim_fraction = trim_fraction

    def _reduce(self, updates: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
        return trimmed_mean(updates, self._trim_fraction)


def make_rule(
    config: AggregationConfig, *, expected_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> AggregationRule:
    """A fresh rule for one round, as ``config`` says; ``expected_shapes`` None lets the first update fix the layout."""
    if config.rule == "mean":
        return MeanRule(clip_norm=config.clip_norm, expected_shapes=expected_shapes)
    if config.rule == "median":
        return MedianRule(clip_norm=config.clip_norm, expected_shapes=expected_shapes)
    return TrimmedMeanRule(
        trim_fraction=config.trim_fraction, clip_norm=config.clip_norm, expected_shapes=expected_shapes
    )
