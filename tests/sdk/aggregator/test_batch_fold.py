"""BatchFold (sdk/aggregator/batch_fold.py): a batch folded update by update equals the running sum fed directly,
the committed sum is never touched, and tensors are let go of unless still needed."""

from __future__ import annotations

import numpy as np

from device_agent.protocol.envelope import OpenedUpdate
from device_agent.protocol.headers import MessageKind, UpdateHeader
from sdk.aggregation import StreamingWeightedMean
from sdk.aggregation.influence import RoundBounds
from sdk.aggregation.robust import clip_by_norm
from sdk.aggregator.admission import Admission, admit
from sdk.aggregator.batch_fold import BatchFold
from sdk.aggregator.records import PartialSum

SHAPES = {"w": (4, 3), "b": (3,)}
BASE = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}


def _admission(seed: int, *, scale: float = 1.0, bounds: RoundBounds | None = None) -> Admission:
    rng = np.random.default_rng(seed)
    tensors = {name: (scale * rng.normal(size=shape)).astype(np.float32) for name, shape in SHAPES.items()}
    header = UpdateHeader.create(kind=MessageKind.UPDATE, fleet="f", sender=f"d{seed}", region="eu", round=0,
                                 bundle_version=1, sample_count=10 + seed)
    opened = OpenedUpdate(header=header, tensors=tensors, sender_key_id="00" * 8)
    return admit(opened, base=BASE, bounds=bounds, weight=float(header.sample_count))


def _committed(admissions: list[Admission]) -> tuple[StreamingWeightedMean, PartialSum]:
    rule = StreamingWeightedMean(expected_shapes=SHAPES)
    for admission in admissions:
        rule.accumulate(admission.opened.tensors, admission.weight)
    return rule, PartialSum(state=rule.to_state(), samples=sum(a.samples for a in admissions))


def test_batch_fold_equals_the_running_sum_fed_directly_and_leaves_the_committed_sum_alone() -> None:
    before = [_admission(s) for s in (1, 2)]
    batch = [_admission(s) for s in (3, 4, 5)]
    rule, partial = _committed(before)
    committed = {name: value.copy() for name, value in rule.to_state().sums.items()}
    direct, direct_partial = _committed(before + batch)  # before the fold lets go of the batch's tensors
    fold = BatchFold(rule, partial, shapes=SHAPES)
    kept = [fold.add(a) for a in batch]
    folded, new_partial = fold.result()

    assert folded is not None and folded.count == 5
    for name in SHAPES:
        assert folded.to_state().sums[name].tobytes() == direct.to_state().sums[name].tobytes()  # same order, same bits
        assert rule.to_state().sums[name].tobytes() == committed[name].tobytes()  # the cache's sum is untouched
    assert (new_partial.samples, new_partial.state.count, new_partial.state.total_weight) == \
        (direct_partial.samples, 5, direct_partial.state.total_weight)
    assert all(k.opened.tensors == {} for k in kept) and all(a.opened.tensors == {} for a in batch)  # let go of once folded
    assert [k.opened.header for k in kept] == [a.opened.header for a in batch] and [k.weight for k in kept] == [a.weight for a in batch]


def test_batch_fold_folds_a_clipped_update_as_clip_by_norm_would() -> None:
    bounds = RoundBounds(clip_norm=0.5, weight_cap=1_000)
    admission = _admission(7, scale=3.0, bounds=bounds)
    assert admission.clipped
    expected = StreamingWeightedMean(expected_shapes=SHAPES)
    expected.accumulate(clip_by_norm(admission.opened.tensors, 0.5).delta, admission.weight)
    fold = BatchFold(StreamingWeightedMean(expected_shapes=SHAPES), PartialSum(), shapes=SHAPES)
    fold.add(admission)
    folded, _ = fold.result()
    assert folded is not None
    for name in SHAPES:
        assert folded.to_state().sums[name].tobytes() == expected.to_state().sums[name].tobytes()


def test_batch_fold_keeps_tensors_when_asked_and_under_a_buffered_rule() -> None:
    admission = _admission(9)
    kept = BatchFold(StreamingWeightedMean(expected_shapes=SHAPES), PartialSum(), shapes=SHAPES, keep_tensors=True).add(admission)
    assert kept.opened.tensors is admission.opened.tensors

    buffered = BatchFold(None, PartialSum(samples=4), shapes=SHAPES)  # a buffered rule: each delta goes into its row
    assert buffered.add(admission).opened.tensors is admission.opened.tensors
    rule, partial = buffered.result()
    assert rule is None and partial.state.sums == {} and partial.state.count == 1
    assert partial.samples == 4 + admission.samples and partial.state.total_weight == admission.weight
