"""Robust aggregation: norm clipping, coordinate-wise median and trimmed mean.

- Norm clipping bounds each update's influence before averaging; it is the
  defence of Sun et al., "Can You Really Backdoor Federated Learning?"
  (arXiv:1911.07963, 2019) and the first step of DP-FedAvg (McMahan et al.,
  "Learning Differentially Private Recurrent Language Models", ICLR 2018).
- Coordinate-wise median and beta-trimmed mean are the estimators of Yin et
  al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates" (ICML 2018); they tolerate a minority of arbitrary (Byzantine) updates.

Cost. Clipping is O(model) time and memory per update and streams. The median
and the trimmed mean do not stream: they need every update of the round in
memory at once, O(n_clients x model), plus one stacked float64 copy of the
largest parameter while it is being reduced, and they sort each coordinate's
n values, O(n log n) per coordinate, against O(model) memory and O(n) time per
coordinate for :class:`~sdk.aggregation.weighted_mean.StreamingWeightedMean`.

Both ignore sample counts: every update counts once, so a device cannot buy
influence by claiming a large sample count (the point of a robust rule), at
the price of statistical efficiency when counts really differ.

All results are float32. An empty list of updates gives ``None``, meaning
"no update this round: keep the previous global model".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from device_agent.parameters import ParameterDict, as_float32, check_positive, check_update, check_weight, global_norm


@dataclass(frozen=True, kw_only=True)
class ClippedDelta:
    """An update after norm clipping.

    ``delta`` is the (possibly scaled) update as float32; ``norm`` its global
    L2 norm before clipping; ``scale`` the factor applied, 1.0 when the norm
    was already within bound.
    """

    delta: dict[str, np.ndarray]
    norm: float
    scale: float

    @property
    def clipped(self) -> bool:
        """True when the update was scaled down."""
        return self.scale < 1.0


def clip_by_norm(delta: ParameterDict, max_norm: float) -> ClippedDelta:
    """Scale ``delta`` so its global L2 norm (all tensors as one vector) is at most ``max_norm``.

    The direction is kept: ``delta * min(1, max_norm / ||delta||)``; the
    clipped norm equals ``max_norm`` up to float32 rounding. Raises
    ``ValueError`` for a ``max_norm`` that is not positive and finite, and for
    an empty or non-finite delta.
    """
    bound = check_positive(max_norm, what="max_norm")
    check_update(None, delta, what="delta")
    norm = global_norm(delta)
    scale = 1.0 if norm <= bound else bound / norm
    return ClippedDelta(delta=scale_delta(delta, scale), norm=norm, scale=scale)


def scale_delta(delta: ParameterDict, scale: float) -> dict[str, np.ndarray]:
    """``delta * scale`` as float32, computed in float64 and rounded once: the values clipping produces.

    For a caller that knows the norm already (the aggregators' intake: its validator measured it); no checks here.
    """
    return {name: as_float32(np.asarray(v, dtype=np.float64) * scale) for name, v in delta.items()}


def _stacked(updates: Sequence[ParameterDict]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, float64 array of shape (n, *shape)) one parameter at a time.

    Checks every update against the first before yielding anything.
    """
    layout = check_update(None, updates[0], what="update 0")
    for i, update in enumerate(updates[1:], start=1):
        check_update(layout, update, what=f"update {i}")
    for name in layout:
        yield name, np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])


def _reduce(
    updates: Sequence[ParameterDict], reducer: Callable[[np.ndarray], np.ndarray]
) -> dict[str, np.ndarray] | None:
    if isinstance(updates, dict) or not isinstance(updates, Sequence):
        raise TypeError("updates must be a sequence of parameter dicts")
    if len(updates) == 0:
        return None
    return {name: as_float32(reducer(stack)) for name, stack in _stacked(updates)}


def coordinate_median(updates: Sequence[ParameterDict]) -> dict[str, np.ndarray] | None:
    """The coordinate-wise median of ``updates``, or None for an empty sequence.

    With an even number of updates each coordinate is the mean of its two
    middle values (``numpy.median``). Weights are not taken: see the module
    docstring. Memory O(n_clients x model), time O(n log n) per coordinate.
    """
    return _reduce(updates, lambda stack: np.median(stack, axis=0))


def trim_count(n_updates: int, trim_fraction: float) -> int:
    """How many values :func:`trimmed_mean` cuts from *each* end: ``floor(trim_fraction * n)``.

    Raises ``ValueError`` unless ``0 <= trim_fraction < 0.5`` (at 0.5 or more
    nothing would be left to average).
    """
    beta = check_weight(trim_fraction, what="trim_fraction")
    if beta >= 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {beta}")
    return math.floor(beta * n_updates)


def trimmed_mean(updates: Sequence[ParameterDict], trim_fraction: float) -> dict[str, np.ndarray] | None:
    """The coordinate-wise beta-trimmed mean of ``updates``, or None for an empty sequence.

    For each coordinate, sort the n values, drop the ``floor(beta * n)``
    smallest and as many largest, and average the rest unweighted (sample
    counts are ignored: see the module docstring). ``trim_fraction`` 0 gives
    the plain unweighted mean. Raises ``ValueError`` unless
    ``0 <= trim_fraction < 0.5``. Memory O(n_clients x model), time
    O(n log n) per coordinate.
    """
    cut = trim_count(len(updates), trim_fraction)

    def reducer(stack: np.ndarray) -> np.ndarray:
        ordered = np.sort(stack, axis=0)
        kept: np.ndarray = ordered[cut : stack.shape[0] - cut].mean(axis=0)
        return kept

    return _reduce(updates, reducer)
