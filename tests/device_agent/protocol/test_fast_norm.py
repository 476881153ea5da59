"""The float32 norm pass decides every check exactly as the float64 pass would (hypothesis), and its bound holds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from device_agent.errors import RejectedUpdateError
from device_agent.parameters import global_norm, sum_of_squares
from device_agent.protocol.fast_norm import decided_alike, float32_squares
from device_agent.protocol.validation import RejectReason, UpdateValidator

SPEC = {"w": ((4, 8), "float32"), "b": ((5,), "float32")}
F32_MAX = float(np.finfo(np.float32).max)

# Every kind of float32 value: ordinary, huge (squares overflow float32, not float64), tiny and subnormal
# (squares underflow float32), zeros of both signs, and now and then NaN or Inf.
_VALUES = st.one_of(
    st.floats(-10.0, 10.0, width=32),
    st.floats(-F32_MAX, F32_MAX, width=32),
    st.sampled_from([1.9e19, -3e19, 1e-20, -1e-30, 1e-45, 0.0, -0.0]),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
)
_OFFSETS = st.sampled_from([0.0, 1e-12, -1e-12, 1e-9, -1e-9, 1e-7, -1e-7, 1e-5, -1e-5, 1e-3, -1e-3, 0.5, -0.5])


def _exact(tensors: dict[str, np.ndarray], max_norm: float | None) -> tuple[str, float]:
    """The decision and norm of the float64 pass (the validator before the float32 pass), written out again."""
    squares = {}
    for name in sorted(tensors):
        squares[name] = sum_of_squares(name, tensors[name])
        if not math.isfinite(squares[name]) and not np.all(np.isfinite(tensors[name])):
            return RejectReason.NON_FINITE.value, math.nan
    norm = global_norm(tensors)
    if max_norm is not None and norm > max_norm:
        return RejectReason.NORM.value, norm
    return "accepted", norm


def _fast(tensors: dict[str, np.ndarray], max_norm: float | None, near: tuple[float, ...]) -> tuple[str, float]:
    try:
        return "accepted", UpdateValidator(params=SPEC, max_norm=max_norm).check_tensors(tensors, exact_near=near)
    except RejectedUpdateError as exc:
        return exc.reason, math.nan


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(w=arrays(np.float32, (4, 8), elements=_VALUES), b=arrays(np.float32, (5,), elements=_VALUES),
       bound_offset=_OFFSETS, clip_offset=_OFFSETS)
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_fast_norm_decides_every_check_as_the_float64_pass(w: np.ndarray, b: np.ndarray, bound_offset: float,
                                                           clip_offset: float) -> None:
    tensors = {"w": w, "b": b}
    reference = _exact(tensors, None)[1]
    bounds = [None]
    if math.isfinite(reference) and reference > 0:  # thresholds at, just around and far from the exact norm
        bounds.append(reference * (1 + bound_offset))
    clip = reference * (1 + clip_offset) if math.isfinite(reference) else 1.0
    for max_norm in bounds:
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            continue
        decision, exact = _exact(tensors, max_norm)
        got, norm = _fast(tensors, max_norm, (clip,))
        assert got == decision, (max_norm, exact, norm)
        if got != "accepted":
            continue
        if math.isinf(exact):  # float32 squares overflowed: measured exactly, never "non-finite"
            assert norm == exact
            continue
        assert (norm <= clip) == (exact <= clip), (norm, exact, clip)  # a clip decision never flips
        if max_norm is not None:
            assert (norm > max_norm) == (exact > max_norm)
        assert abs(norm - exact) <= 4e-6 * exact + 1e-18, (norm, exact)  # 38 squares: (n + 1) 2**-24 and padding


def test_fast_norm_falls_back_to_float64_when_float32_squares_overflow() -> None:
    huge = {"w": np.full((4, 8), 2e19, np.float32), "b": np.zeros(5, np.float32)}  # squares 4e38 > float32's max
    assert float32_squares(huge["w"]) is None
    validator = UpdateValidator(params=SPEC)
    assert validator.check_tensors(huge) == global_norm(huge)  # the norm, not "non_finite"
    with pytest.raises(RejectedUpdateError, match="norm"):
        UpdateValidator(params=SPEC, max_norm=1e20).check_tensors(huge)


def test_fast_norm_bound_holds_for_a_large_tensor_and_decides_alike_only_outside_it() -> None:
    x = np.random.default_rng(3).normal(scale=0.01, size=100_000).astype(np.float32)
    total, error = float32_squares(x)  # type: ignore[misc]
    exact = float(np.dot(x.astype(np.float64), x.astype(np.float64)))
    assert abs(total - exact) <= error and error < 1e-2 * exact
    norm = math.sqrt(total)
    assert decided_alike(norm, error, (norm * 2, norm / 2))
    assert not decided_alike(norm, error, (norm,)) and not decided_alike(norm, error, (math.sqrt(exact),))
    assert float32_squares(x.astype(np.float64)) is None  # float64 tensors keep the exact pass
