"""Bounded influence: how far one authenticated device can pull a round's weighted mean.

A device's update enters the mean as ``w_k * clip(d_k)`` over ``sum_k w_k``.
Both factors are the device's own claims (its tensors and its ``sample_count``),
so both are bounded before anything is folded in:

- **Weight cap.** ``w_k = min(n_k, cap_r)``. With ``weight="adaptive"`` (the
  default) ``cap_r`` is ``weight_multiplier`` times the median of the sample
  counts the previous round's updates claimed, never above ``max_sample_count``;
  until a round with at least ``min_history`` updates has been seen, ``cap_r = 1``
  (every device weighs the same: nobody can buy influence with a count before
  the fleet has a history). ``weight="fixed"`` caps at ``max_sample_count`` only.
  An over-cap count is *clipped*, not rejected: a sample count cannot be
  verified, so refusing the update would cost an honest data-rich device its
  whole round and give a liar nothing more than the cap does. This is the
  capped weighting of DP-FedAvg, ``w_k = min(n_k / w_hat, 1)`` (McMahan et al.,
  "Learning Differentially Private Recurrent Language Models", ICLR 2018).
- **Norm clip.** ``clip(d) = d * min(1, B_r / ||d||)`` (global L2 norm over
  every tensor). With ``norm="adaptive"`` (the default) ``B_r`` is
  ``norm_multiplier`` times the ``norm_quantile`` of the raw (unclipped) norms
  of the previous round's updates: clipping to a quantile of the update norms
  as in Andrew et al., "Differentially Private Learning with Adaptive
  Clipping" (NeurIPS 2021). Their estimate follows the quantile geometrically
  across rounds because under DP the norms are private; an aggregator that
  folds updates in one at a time cannot know the *current* round's quantile
  before it folds, but it does know the exact norms of the previous round, so
  it uses those (robust while fewer than half the updates are hostile, for the
  median). ``norm_bound`` is the first round's bound. ``norm="fixed"`` keeps
  ``norm_bound`` for ever. ``norm="unbounded"`` turns clipping off and is
  **unsafe**: one device then moves the model as far as it likes.

A round's bounds (:class:`RoundBounds`) are decided when the round starts and
stored with it, so every process of a region and every restart use the same
ones. Pure functions, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

NormMode = Literal["adaptive", "fixed", "unbounded"]
WeightMode = Literal["adaptive", "fixed"]

MAX_SAMPLE_COUNT = (1 << 32) - 1
"""The largest ``max_sample_count`` allowed: a round of 2**20 devices at the cap still sums below 2**53."""


@dataclass(frozen=True, kw_only=True)
class InfluencePolicy:
    """How a regional aggregator bounds each device's pull on the mean (see the module docstring).

    ``norm``: ``"adaptive"`` (default), ``"fixed"`` or ``"unbounded"`` (unsafe).
    ``norm_bound``: the fixed bound, or the adaptive bound of the first round.
    ``norm_quantile`` / ``norm_multiplier``: the adaptive bound is
    ``norm_multiplier x`` that quantile of the previous round's update norms.
    ``weight``: ``"adaptive"`` (default) or ``"fixed"``. ``max_sample_count``:
    the most any device may weigh, always applied (the fleet cap).
    ``weight_multiplier``: the adaptive cap is that times the previous
    round's median claimed sample count. ``min_history``: how many updates a
    round needs before its statistics move the next round's bounds (fewer:
    the bounds carry over).
    """

    norm: NormMode = "adaptive"
    norm_bound: float = 1.0
    norm_quantile: float = 0.5
    norm_multiplier: float = 1.0
    weight: WeightMode = "adaptive"
    max_sample_count: int = 100_000
    weight_multiplier: float = 1.0
    min_history: int = 3

    def __post_init__(self) -> None:
        if self.norm not in ("adaptive", "fixed", "unbounded"):
            raise ValueError(f"norm must be 'adaptive', 'fixed' or 'unbounded', got {self.norm!r}")
        if self.weight not in ("adaptive", "fixed"):
            raise ValueError(f"weight must be 'adaptive' or 'fixed', got {self.weight!r}")
        for name in ("norm_bound", "norm_multiplier", "weight_multiplier"):
            _positive(name, getattr(self, name))
        q = self.norm_quantile
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q <= 1.0:
            raise ValueError(f"norm_quantile must be in (0, 1], got {q!r}")
        for name, low, high in (("max_sample_count", 1, MAX_SAMPLE_COUNT), ("min_history", 1, 1 << 20)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")

    @property
    def unsafe(self) -> bool:
        """True when updates are not norm-bounded at all (``norm="unbounded"``)."""
        return self.norm == "unbounded"


@dataclass(frozen=True, kw_only=True)
class RoundBounds:
    """The bounds of one round: ``clip_norm`` None means unbounded (unsafe); ``weight_cap`` >= 1."""

    clip_norm: float | None
    weight_cap: int

    def __post_init__(self) -> None:
        if self.clip_norm is not None:
            _positive("clip_norm", self.clip_norm)
        if isinstance(self.weight_cap, bool) or not isinstance(self.weight_cap, int) or not 1 <= self.weight_cap <= MAX_SAMPLE_COUNT:
            raise ValueError(f"weight_cap must be an integer in 1..{MAX_SAMPLE_COUNT}, got {self.weight_cap!r}")

    def weight(self, sample_count: int) -> int:
        """The weight of an update claiming ``sample_count`` examples: ``min(sample_count, weight_cap)``."""
        return min(int(sample_count), self.weight_cap)

    def clip_scale(self, norm: float) -> float:
        """The factor clipping applies to an update of L2 norm ``norm``: ``min(1, clip_norm / norm)`` (1 when unbounded)."""
        if self.clip_norm is None or norm <= self.clip_norm:
            return 1.0
        return self.clip_norm / norm


def first_bounds(policy: InfluencePolicy) -> RoundBounds:
    """The bounds of a round with no history: ``norm_bound`` (None if unbounded) and weight cap 1
    (adaptive: every device weighs the same) or ``max_sample_count`` (fixed)."""
    return RoundBounds(
        clip_norm=None if policy.unsafe else float(policy.norm_bound),
        weight_cap=1 if policy.weight == "adaptive" else policy.max_sample_count,
    )


def next_bounds(policy: InfluencePolicy, previous: RoundBounds, *, norms: Sequence[float],
                sample_counts: Sequence[int]) -> RoundBounds:
    """The next round's bounds from the previous round's bounds and its accepted updates' raw norms and claimed counts.

    With fewer than ``min_history`` updates the adaptive parts carry over from
    ``previous``. Non-finite or non-positive statistics (all-zero updates) also carry over.
    """
    clip = None if policy.unsafe else float(policy.norm_bound)
    cap = 1 if policy.weight == "adaptive" else policy.max_sample_count
    if policy.norm == "adaptive":
        clip = previous.clip_norm if previous.clip_norm is not None else float(policy.norm_bound)
    if policy.weight == "adaptive":
        cap = previous.weight_cap
    if len(norms) >= policy.min_history and policy.norm == "adaptive":
        estimate = policy.norm_multiplier * float(np.quantile(np.asarray(norms, dtype=np.float64), policy.norm_quantile))
        if math.isfinite(estimate) and estimate > 0:
            clip = estimate
    if len(sample_counts) >= policy.min_history and policy.weight == "adaptive":
        median = float(np.median(np.asarray(sample_counts, dtype=np.float64)))
        cap = max(1, min(policy.max_sample_count, math.floor(policy.weight_multiplier * median)))
    return RoundBounds(clip_norm=clip, weight_cap=min(cap, policy.max_sample_count))


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
