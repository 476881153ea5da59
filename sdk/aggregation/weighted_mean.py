"""Streaming sample-weighted mean of parameter dicts: the FedAvg aggregation step.

FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks
from Decentralized Data", AISTATS 2017) averages client updates weighted by
their sample counts n_k: ``mean = sum_k n_k * delta_k / sum_k n_k``.

:class:`StreamingWeightedMean` folds updates in one at a time, so a regional
aggregator needs O(model) memory whatever the number of devices: one float64
running sum per parameter plus two scalars. float64 keeps the sum of many
float32 updates accurate (float32 would lose about log2(n) bits over n
updates); the mean is handed back as float32, the wire and model dtype.

The running state (:class:`WeightedMeanState`) is plain data (arrays and
scalars), so the aggregator can write it to SQLite after each accepted update
and resume after a restart: resuming from a state and folding in the rest
gives bit-for-bit the result of an uninterrupted run. Which (device, round)
pairs were already folded in is the aggregator's business, not this module's.

Nothing accumulated, or only zero weights: :meth:`StreamingWeightedMean.finalize`
returns ``None``, meaning "no update this round: keep the previous global model".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from device_agent.parameters import (
    Layout,
    ParameterDict,
    as_float32,
    check_layout,
    check_update,
    check_weight,
    layout_from_shapes,
    layout_of,
)


@dataclass(frozen=True, kw_only=True)
class WeightedMeanState:
    """A snapshot of a running weighted sum, for durable storage.

    ``sums`` maps each parameter to ``sum_k weight_k * delta_k`` (float64);
    it is empty when nothing fixed the layout yet. ``total_weight`` is
    ``sum_k weight_k``; ``count`` the number of updates folded in (zero-weight
    ones included). The arrays belong to the snapshot: later accumulation does
    not change them.
    """

    sums: Mapping[str, np.ndarray] = field(default_factory=dict)
    total_weight: float = 0.0
    count: int = 0


class StreamingWeightedMean:
    """Accumulates weighted parameter-dict deltas one at a time in O(model) memory.

    ``expected_shapes`` fixes the layout up front (e.g. from the global
    model); None lets the first accumulated delta fix it. One instance serves
    one round.
    """

    def __init__(self, *, expected_shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._layout: Layout | None = None
        self._total_weight = 0.0
        self._count = 0
        if expected_shapes is not None:
            self._start(layout_from_shapes(expected_shapes))

    def _start(self, layout: Layout) -> None:
        self._layout = layout
        self._sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in layout.items()}

    @property
    def count(self) -> int:
        """How many updates were folded in, zero-weight ones included."""
        return self._count

    @property
    def total_weight(self) -> float:
        """The sum of the weights folded in (0.0 before any)."""
        return self._total_weight

    @property
    def layout(self) -> Layout | None:
        """Parameter name -> shape every update must match; None until fixed."""
        return None if self._layout is None else dict(self._layout)

    def accumulate(self, delta: ParameterDict, weight: float, *, checked: bool = False) -> None:
        """Fold ``delta`` in with ``weight`` (typically the device's sample count).

        Raises ``ValueError`` for a layout mismatch, a non-finite value, or a
        negative or non-finite weight, and ``TypeError`` for non-numeric input;
        on error nothing changes. A zero weight is counted but contributes nothing.

        ``checked``: the caller has validated ``delta`` already (real dtypes, finite values: the aggregators'
        :class:`~device_agent.protocol.validation.UpdateValidator` did), so only its names and shapes are compared
        with the fixed layout (ValueError when they differ, or when no layout is fixed yet); the scan for
        non-finite values, a second pass over the delta, is skipped.
        """
        w = check_weight(weight)
        if checked:
            self._check_names_and_shapes(delta)
        else:
            layout = check_update(self._layout, delta)
            if self._layout is None:
                self._start(layout)
        if w == 0.0:
            self._count += 1
            return
        for name, value in delta.items():
            # In place, in float64: O(model) extra memory for the cast, never O(devices).
            self._sums[name] += w * np.asarray(value, dtype=np.float64)
        self._total_weight += w
        self._count += 1

    def _check_names_and_shapes(self, delta: ParameterDict) -> None:
        """ValueError unless ``delta`` has exactly the names and shapes of the fixed layout (cheap: no pass over values)."""
        if self._layout is None:
            raise ValueError("a checked delta needs a fixed layout (expected_shapes, or an earlier delta)")
        if delta.keys() != self._layout.keys():
            check_layout(self._layout, delta)  # names the missing and unexpected parameters
        for name, shape in self._layout.items():
            if np.shape(delta[name]) != shape:
                raise ValueError(f"update: parameter {name!r} has shape {np.shape(delta[name])}, expected {shape}")

    def finalize(self) -> dict[str, np.ndarray] | None:
        """The weighted mean as float32 arrays, or None when the total weight is 0.

        None (nothing accumulated, or only zero weights) means "no update this
        round: keep the previous global model". Does not reset the accumulator.
        """
        if self._total_weight == 0.0:
            return None
        return {name: as_float32(s / self._total_weight) for name, s in self._sums.items()}

    def to_state(self) -> WeightedMeanState:
        """A copy of the running state as plain data, for durable storage."""
        return WeightedMeanState(
            sums={name: s.copy() for name, s in self._sums.items()},
            total_weight=self._total_weight,
            count=self._count,
        )

    @classmethod
    def from_state(cls, state: WeightedMeanState) -> StreamingWeightedMean:
        """Rebuild an accumulator from :meth:`to_state` output (arrays are copied).

        Raises ``ValueError``/``TypeError`` for an inconsistent state: negative
        or non-finite scalars, non-finite sums, or sums but a zero count.
        """
        if not isinstance(state, WeightedMeanState):
            raise TypeError(f"expected WeightedMeanState, got {type(state).__name__}")
        total = check_weight(state.total_weight, what="state.total_weight")
        if isinstance(state.count, bool) or not isinstance(state.count, (int, np.integer)) or state.count < 0:
            raise ValueError(f"state.count must be an int >= 0, got {state.count!r}")
        if state.count == 0 and total != 0.0:
            raise ValueError("state has a positive total weight but a count of 0")
        acc = cls()
        if state.sums:
            acc._start(layout_of(state.sums))
            for name, value in state.sums.items():
                arr = np.asarray(value, dtype=np.float64)
                if not np.all(np.isfinite(arr)):
                    raise ValueError(f"state.sums[{name!r}] holds NaN or infinite values")
                acc._sums[name] = arr.copy()
        elif state.count > 0:
            raise ValueError("state counts updates but holds no sums")
        acc._total_weight = total
        acc._count = int(state.count)
        return acc


def weighted_mean(updates: Sequence[ParameterDict], weights: Sequence[float]) -> dict[str, np.ndarray] | None:
    """The weighted mean of ``updates`` as float32 arrays, or None when the weights sum to 0.

    An empty ``updates`` also gives None ("keep the previous global model").
    Raises ``ValueError`` when the two sequences differ in length, plus the
    errors of :meth:`StreamingWeightedMean.accumulate`.
    """
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    acc = StreamingWeightedMean()
    for update, weight in zip(updates, weights):
        acc.accumulate(update, weight)
    return acc.finalize()

