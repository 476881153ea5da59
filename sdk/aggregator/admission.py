"""What an authentic, valid update will weigh and whether folding it in is safe: pure checks, no store.

Runs after the validator and before the acceptance transaction. It takes
the update's raw L2 norm (as the validator measured it, or measures it), applies the round's influence bounds
(:class:`~sdk.aggregation.influence.RoundBounds`: weight cap, clip scale) and
refuses anything whose arithmetic could fail later, so that a round's close
never throws accepted work away:

- ``non_finite``: the (clipped) delta applied to the round's base model would
  leave float32's range (``|value| > 1.7e38``). The mean of accepted deltas is
  a convex combination of them, so if every ``base + d_k`` is finite, so is
  ``base + mean``.
- ``sample_count``: accepting it would push the round's sample total past
  ``2**53 - 1``, the largest count a header carries exactly (checked in the
  transaction, where the total is known: :func:`check_round_total`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from device_agent.errors import RejectedUpdateError
from device_agent.parameters import global_norm
from device_agent.protocol.envelope import OpenedUpdate
from device_agent.protocol.validation import RejectReason
from sdk.aggregation.influence import RoundBounds
from sdk.aggregator.contributors import Contributors

MAX_TOTAL_SAMPLES = (1 << 53) - 1
FLOAT32_SAFE = float(np.finfo(np.float32).max) / 2
"""The largest magnitude a delta may give a parameter (half of float32's maximum, a margin for rounding)."""


@dataclass(frozen=True, kw_only=True)
class Admission:
    """One update ready to fold: ``opened`` (tensors only), its ``weight`` in the mean, the ``samples`` it adds to
    the round's total, its raw ``norm``, the ``scale`` clipping applies to it (1.0: none), whether clipping or the
    weight cap changed it, and (root) its contributors."""

    opened: OpenedUpdate
    weight: float
    samples: int
    norm: float
    clipped: bool
    capped: bool
    contributors: Contributors | None = None
    scale: float = 1.0


def admit(opened: OpenedUpdate, *, base: Mapping[str, np.ndarray], bounds: RoundBounds | None, weight: float,
          contributors: Contributors | None = None, base_largest: float | None = None, norm: float | None = None) -> Admission:
    """Measure ``opened`` against the round: ``weight`` is its unbounded weight (a sample count, or 1 for uniform).

    ``base_largest``: max |x| over the round's ``base`` model (:func:`largest_magnitude`, computed once per round;
    None: computed here). ``norm``: its global L2 norm as the validator measured it
    (:meth:`~device_agent.protocol.validation.UpdateValidator.check_tensors`; None: measured here).
    RejectedUpdateError ``non_finite`` when applying it could overflow float32.
    """
    header = opened.header
    if norm is None:
        norm = global_norm(opened.tensors)
    scale = 1.0 if bounds is None else bounds.clip_scale(norm)
    if base_largest is None:
        base_largest = largest_magnitude(base)
    # |x| <= the L2 norm for every entry, so this settles almost every update without touching the tensors again.
    settled = base_largest + scale * norm <= FLOAT32_SAFE
    for name, value in {} if settled else opened.tensors.items():
        if _largest(base[name]) + scale * _largest(value) <= FLOAT32_SAFE:
            continue  # the cheap bound (no temporaries) settles almost every update
        moved = np.asarray(base[name], dtype=np.float64) + np.asarray(value, dtype=np.float64) * scale
        if not np.all(np.abs(moved) <= FLOAT32_SAFE):
            raise RejectedUpdateError(RejectReason.NON_FINITE.value, f"{name}: applying it to the round's model leaves float32's range")
    samples = header.sample_count if bounds is None else bounds.weight(header.sample_count)
    bounded_weight = weight if bounds is None else float(min(weight, bounds.weight_cap))
    return Admission(opened=opened, weight=bounded_weight, samples=samples, norm=norm, clipped=scale < 1.0,
                     capped=bounds is not None and header.sample_count > bounds.weight_cap, contributors=contributors,
                     scale=scale)


def largest_magnitude(params: Mapping[str, np.ndarray]) -> float:
    """max |x| over every array of ``params`` (0 for none)."""
    return max((_largest(np.asarray(value)) for value in params.values()), default=0.0)


def _largest(array: np.ndarray) -> float:
    """max |x| over ``array`` (0 for an empty one), from its min and max: no temporary array."""
    if array.size == 0:
        return 0.0
    return max(abs(float(np.min(array))), abs(float(np.max(array))))


def check_round_total(total_samples: int, admission: Admission) -> None:
    """RejectedUpdateError ``sample_count`` when adding ``admission`` would push the round's total past 2**53 - 1."""
    if total_samples + admission.samples > MAX_TOTAL_SAMPLES:
        raise RejectedUpdateError(
            RejectReason.SAMPLE_COUNT.value,
            f"the round already counts {total_samples} samples; {admission.samples} more would exceed {MAX_TOTAL_SAMPLES}")
