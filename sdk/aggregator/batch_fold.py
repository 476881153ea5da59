"""One batch's fold, made as each update is admitted: pure logic, no I/O.

The intake folds an admitted update into a copy of the running sum at once and
then lets go of its tensors, so a batch of 32 updates never holds 32 decoded
deltas (13 MB at 100k parameters) between opening them and committing them: an
update's bytes are still in the CPU's caches when they are validated and folded,
as on the in-memory path (docs/benchmarks.md, the aggregator benchmark). The copy
becomes the cache's running sum only after the batch commits.

Buffered rules (median, trimmed mean, ...) keep every delta in its store row, so
under them nothing is folded and every admitted update keeps its tensors.
"""

from __future__ import annotations

from sdk.aggregation import StreamingWeightedMean, WeightedMeanState
from sdk.aggregation.robust import scale_delta
from sdk.aggregator.admission import Admission
from sdk.aggregator.records import PartialSum


class BatchFold:
    """The committed running sum (``rule``: None for a buffered rule; ``partial``) plus the updates :meth:`add` folds.

    ``shapes``: the parameters' shapes (a sum that has counted nothing starts from them). ``keep_tensors``: the
    admitted updates keep their tensors (the caller hands accepted deltas on, e.g. FedFomo's candidate pool).
    """

    def __init__(self, rule: StreamingWeightedMean | None, partial: PartialSum, *, shapes: dict[str, tuple[int, ...]],
                 keep_tensors: bool = False) -> None:
        self._committed = partial
        self._buffered = rule is None
        self._keep = keep_tensors or self._buffered  # a buffered rule writes each delta into its row at the commit
        self._rule: StreamingWeightedMean | None = None
        if rule is not None:  # a copy: the cache keeps the committed sum until the batch commits
            self._rule = StreamingWeightedMean.from_state(rule.to_state()) if rule.count else \
                StreamingWeightedMean(expected_shapes=shapes)
        self._weight = 0.0
        self._samples = 0
        self._count = 0

    def add(self, admission: Admission) -> Admission:
        """Fold ``admission`` in (clipped by its scale); returns it without its tensors unless they are still needed."""
        if self._rule is not None:
            delta = admission.opened.tensors
            if admission.clipped:
                # clip_by_norm's values (float64 product, rounded to float32 once) from the norm the validator
                # measured; an update within the bound folds as it is (clip_by_norm would return the same values).
                delta = scale_delta(delta, admission.scale)
            self._rule.accumulate(delta, admission.weight, checked=True)  # the validator checked names, shapes, finiteness
        self._weight += admission.weight
        self._samples += admission.samples
        self._count += 1
        if not self._keep:
            # Let go of the decoded arrays. In place: the dict belongs to this admission alone (the intake's own
            # OpenedUpdate), and two dataclass copies per update cost more than the fold of a small model.
            admission.opened.tensors.clear()
        return admission

    def result(self) -> tuple[StreamingWeightedMean | None, PartialSum]:
        """The folded sum (None for a buffered rule) and the partial sum to commit."""
        samples = self._committed.samples + self._samples
        if self._rule is None:  # buffered rules keep each delta in its row; the sum only counts
            old = self._committed.state
            state = WeightedMeanState(sums={}, total_weight=old.total_weight + self._weight, count=old.count + self._count)
            return None, PartialSum(state=state, samples=samples)
        return self._rule, PartialSum(state=self._rule.to_state(), samples=samples)
