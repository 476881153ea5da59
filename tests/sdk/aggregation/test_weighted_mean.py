"""Tests for sdk.aggregation.weighted_mean: the streaming FedAvg mean and its persistable state."""

from __future__ import annotations

import numpy as np
import pytest

from sdk.aggregation.weighted_mean import StreamingWeightedMean, WeightedMeanState, weighted_mean

from .known_answers import assert_params_close, known_answers, params


def test_weighted_mean_matches_known_answer() -> None:
    k = known_answers()
    assert_params_close(weighted_mean(k["updates"], k["weights"]), k["weighted_mean"])


def test_streaming_weighted_mean_hand_computed_two_clients() -> None:
    acc = StreamingWeightedMean()
    acc.accumulate(params(w=[1.0, 2.0], b=3.0), 1)
    acc.accumulate(params(w=[3.0, 6.0], b=-1.0), 3)
    # (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5.0]; (1*3 + 3*-1) / 4 = 0
    assert_params_close(acc.finalize(), params(w=[2.5, 5.0], b=0.0))
    assert acc.count == 2
    assert acc.total_weight == 4.0


def test_streaming_weighted_mean_one_client_returns_its_delta_as_a_copy() -> None:
    delta = params(w=[0.5, -1.5])
    acc = StreamingWeightedMean()
    acc.accumulate(delta, 17)
    result = acc.finalize()
    assert_params_close(result, delta)
    assert result is not None
    result["w"][0] = 99.0
    assert delta["w"][0] == 0.5


def test_streaming_weighted_mean_nothing_accumulated_finalizes_to_none() -> None:
    acc = StreamingWeightedMean()
    assert acc.finalize() is None
    assert acc.count == 0
    assert acc.total_weight == 0.0


def test_streaming_weighted_mean_only_zero_weights_finalizes_to_none() -> None:
    acc = StreamingWeightedMean()
    acc.accumulate(params(w=[1.0]), 0)
    acc.accumulate(params(w=[2.0]), 0.0)
    assert acc.finalize() is None
    assert acc.count == 2


def test_streaming_weighted_mean_zero_weight_contributes_nothing() -> None:
    acc = StreamingWeightedMean()
    acc.accumulate(params(w=[1.0]), 2)
    acc.accumulate(params(w=[1000.0]), 0)
    assert_params_close(acc.finalize(), params(w=[1.0]))


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1, -1e-9])
def test_streaming_weighted_mean_rejects_bad_weight_and_keeps_state(weight: float) -> None:
    acc = StreamingWeightedMean()
    acc.accumulate(params(w=[1.0]), 1)
    with pytest.raises(ValueError, match="weight"):
        acc.accumulate(params(w=[5.0]), weight)
    assert acc.count == 1
    assert_params_close(acc.finalize(), params(w=[1.0]))


@pytest.mark.parametrize("weight", [True, "3", None])
def test_streaming_weighted_mean_rejects_non_numeric_weight(weight: object) -> None:
    with pytest.raises(TypeError):
        StreamingWeightedMean().accumulate(params(w=[1.0]), weight)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (params(w=[1.0, 2.0, 3.0], b=0.0), "shape"),
        (params(w=[1.0, 2.0]), r"missing parameters \['b'\]"),
        (params(w=[1.0, 2.0], b=0.0, extra=1.0), r"unexpected parameters \['extra'\]"),
    ],
)
def test_streaming_weighted_mean_rejects_mismatched_layout_and_keeps_state(
    bad: dict[str, np.ndarray], message: str
) -> None:
    acc = StreamingWeightedMean()
    acc.accumulate(params(w=[1.0, 2.0], b=0.0), 1)
    with pytest.raises(ValueError, match=message):
        acc.accumulate(bad, 1)
    assert acc.count == 1
    assert_params_close(acc.finalize(), params(w=[1.0, 2.0], b=0.0))


def test_streaming_weighted_mean_expected_shapes_checks_the_first_update() -> None:
    acc = StreamingWeightedMean(expected_shapes={"w": (2,)})
    with pytest.raises(ValueError, match="shape"):
        acc.accumulate(params(w=[1.0, 2.0, 3.0]), 1)
    assert acc.count == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_streaming_weighted_mean_rejects_non_finite_delta(value: float) -> None:
    acc = StreamingWeightedMean()
    with pytest.raises(ValueError, match="NaN or infinite"):
        acc.accumulate(params(w=[1.0, value]), 1)
    assert acc.finalize() is None


def test_streaming_weighted_mean_rejects_non_numeric_delta() -> None:
    with pytest.raises(TypeError, match="dtype"):
        StreamingWeightedMean().accumulate({"w": np.array([True, False])}, 1)


def test_streaming_weighted_mean_accumulates_in_float64() -> None:
    # In float32, 1e8 + 1 rounds back to 1e8 and the 1 is lost; float64 keeps it.
    acc = StreamingWeightedMean()
    for value in (1e8, 1.0, -1e8):
        acc.accumulate(params(w=[value]), 1)
    result = acc.finalize()
    assert result is not None
    np.testing.assert_allclose(result["w"], [1.0 / 3.0], rtol=1e-6)


def test_streaming_weighted_mean_scalar_parameter_stays_an_ndarray() -> None:
    acc = StreamingWeightedMean()
    acc.accumulate(params(s=2.0), 1)
    result = acc.finalize()
    assert result is not None
    assert isinstance(result["s"], np.ndarray) and result["s"].shape == ()


def test_weighted_mean_does_not_modify_inputs() -> None:
    k = known_answers()
    before = [{n: v.copy() for n, v in u.items()} for u in k["updates"]]
    weighted_mean(k["updates"], k["weights"])
    for original, update in zip(before, k["updates"]):
        for name in original:
            np.testing.assert_array_equal(original[name], update[name])


def test_weighted_mean_empty_returns_none() -> None:
    assert weighted_mean([], []) is None


def test_weighted_mean_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        weighted_mean([params(w=[1.0]), params(w=[2.0])], [1])


def _through_storage(state: WeightedMeanState) -> WeightedMeanState:
    """What a SQLite edge would do: arrays to bytes + dtype + shape, scalars as numbers, and back."""
    rows = {name: (a.tobytes(), a.dtype.str, a.shape) for name, a in state.sums.items()}
    scalars = (float(state.total_weight), int(state.count))
    sums = {name: np.frombuffer(blob, dtype=dt).reshape(shape) for name, (blob, dt, shape) in rows.items()}
    return WeightedMeanState(sums=sums, total_weight=scalars[0], count=scalars[1])


@pytest.mark.parametrize("stop_after", [0, 1, 3, 6])
def test_streaming_weighted_mean_state_round_trip_equals_uninterrupted(stop_after: int) -> None:
    k = known_answers()
    pairs = list(zip(k["updates"], k["weights"]))

    uninterrupted = StreamingWeightedMean()
    for update, weight in pairs:
        uninterrupted.accumulate(update, weight)

    first = StreamingWeightedMean()
    for update, weight in pairs[:stop_after]:
        first.accumulate(update, weight)
    resumed = StreamingWeightedMean.from_state(_through_storage(first.to_state()))
    for update, weight in pairs[stop_after:]:
        resumed.accumulate(update, weight)

    expected = uninterrupted.finalize()
    actual = resumed.finalize()
    assert expected is not None and actual is not None
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])  # bit for bit
    assert resumed.count == uninterrupted.count
    assert resumed.total_weight == uninterrupted.total_weight


def test_streaming_weighted_mean_state_is_a_snapshot() -> None:
    acc = StreamingWeightedMean()
    acc.accumulate(params(w=[1.0]), 1)
    state = acc.to_state()
    acc.accumulate(params(w=[3.0]), 1)
    np.testing.assert_array_equal(state.sums["w"], [1.0])
    assert state.count == 1 and state.total_weight == 1.0


def test_streaming_weighted_mean_empty_state_keeps_expected_shapes() -> None:
    acc = StreamingWeightedMean(expected_shapes={"w": (2,)})
    resumed = StreamingWeightedMean.from_state(acc.to_state())
    assert resumed.layout == {"w": (2,)}
    assert resumed.finalize() is None
    with pytest.raises(ValueError, match="shape"):
        resumed.accumulate(params(w=[1.0]), 1)


@pytest.mark.parametrize(
    "state",
    [
        WeightedMeanState(sums={"w": np.zeros(1)}, total_weight=-1.0, count=1),
        WeightedMeanState(sums={"w": np.zeros(1)}, total_weight=float("nan"), count=1),
        WeightedMeanState(sums={"w": np.zeros(1)}, total_weight=1.0, count=-1),
        WeightedMeanState(sums={"w": np.zeros(1)}, total_weight=1.0, count=0),
        WeightedMeanState(sums={"w": np.array([np.inf])}, total_weight=1.0, count=1),
        WeightedMeanState(sums={}, total_weight=0.0, count=2),
    ],
)
def test_streaming_weighted_mean_from_state_rejects_inconsistent_state(state: WeightedMeanState) -> None:
    with pytest.raises(ValueError):
        StreamingWeightedMean.from_state(state)


def test_checked_accumulate_gives_the_same_sums_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    shapes = {"w": (4, 3), "b": (3,)}
    deltas = [{n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()} for _ in range(5)]
    plain, checked = StreamingWeightedMean(expected_shapes=shapes), StreamingWeightedMean(expected_shapes=shapes)
    for k, delta in enumerate(deltas):
        plain.accumulate(delta, 1.0 + 7 * k)
        checked.accumulate(delta, 1.0 + 7 * k, checked=True)
    for name, value in plain.to_state().sums.items():
        assert np.array_equal(checked.to_state().sums[name], value)
    assert checked.count == plain.count and checked.total_weight == plain.total_weight


@pytest.mark.parametrize("delta", [
    {"w": np.zeros((4, 3), np.float32)},                                               # missing b
    {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32), "x": np.zeros(1)},  # unexpected x
    {"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)},                   # wrong shape
])
def test_checked_accumulate_still_compares_names_and_shapes(delta: dict[str, np.ndarray]) -> None:
    acc = StreamingWeightedMean(expected_shapes={"w": (4, 3), "b": (3,)})
    with pytest.raises(ValueError):
        acc.accumulate(delta, 1.0, checked=True)
    assert acc.count == 0


def test_checked_accumulate_needs_a_fixed_layout() -> None:
    with pytest.raises(ValueError, match="layout"):
        StreamingWeightedMean().accumulate({"b": np.zeros(3, np.float32)}, 1.0, checked=True)
