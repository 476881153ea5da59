"""Error feedback: what is sent plus what is kept equals what was trained, exactly; top-k and quantisation pieces."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.compression import CompressionSpec, compress_delta, decoded_values, dequantise, quantise, top_k_indices
from device_agent.compression.quantise import pack_codes, unpack_codes

SPECS = ["q8", "q4", "q4/3", "topk:0.1", "topk:0.5+q8/4", "topk:0.05+q4", "topk:1+q8", "q6/8+deflate"]


@st.composite
def grid_deltas(draw: st.DrawFn) -> list[dict[str, np.ndarray]]:
    """Rounds of deltas on the grid k * 2**-20, |k| < 2**30: every float64 sum over them is exact."""
    rounds = draw(st.integers(1, 6))
    shapes = {"w": (draw(st.integers(1, 7)), draw(st.integers(1, 9))), "b": (draw(st.integers(1, 40)),)}
    out = []
    for _ in range(rounds):
        out.append({
            name: (np.array(draw(st.lists(st.integers(-(2**23), 2**23), min_size=int(np.prod(s)), max_size=int(np.prod(s)))),
                            dtype=np.float64).reshape(s) * 2.0**draw(st.integers(-20, -8))).astype(np.float32)
            for name, s in shapes.items()
        })
    return out


@pytest.mark.parametrize("text", SPECS)
def test_feedback_sent_plus_residual_equals_the_sum_of_true_deltas_exactly(text: str) -> None:
    spec = CompressionSpec.parse(text)

    @settings(max_examples=40, deadline=None, database=None, derandomize=True)
    @given(grid_deltas())
    def check(rounds: list[dict[str, np.ndarray]]) -> None:
        residual = None
        sent = {n: np.zeros(v.shape) for n, v in rounds[0].items()}
        for delta in rounds:
            out = compress_delta(delta, residual, spec)
            decoded = decoded_values(out.tensors)
            for name in delta:
                # One round: decoded + new residual == delta + old residual, bit for bit.
                before = delta[name].astype(np.float64) + (0.0 if residual is None else residual[name])
                assert np.array_equal(decoded[name].astype(np.float64) + out.residual[name], before)
                sent[name] += decoded[name]
            residual = out.residual
        for name in sent:
            truth = sum(d[name].astype(np.float64) for d in rounds)
            assert np.array_equal(sent[name] + residual[name], truth)

    check()


def test_feedback_none_sends_the_delta_unchanged_and_keeps_an_old_residual() -> None:
    delta = {"w": np.array([1.5, -2.0], np.float32)}
    out = compress_delta(delta, {"w": np.array([0.25, 0.0])}, CompressionSpec.parse("none"))
    assert out.tensors["w"] is delta["w"]
    np.testing.assert_array_equal(out.residual["w"], [0.25, 0.0])


def test_feedback_residual_is_what_top_k_left_out() -> None:
    delta = {"w": np.array([0.1, -3.0, 0.2, 2.0], np.float32)}
    out = compress_delta(delta, None, CompressionSpec.parse("topk:0.5"))
    np.testing.assert_array_equal(decoded_values(out.tensors)["w"], np.array([0, -3, 0, 2], np.float32))
    np.testing.assert_array_equal(out.residual["w"], np.array([0.1, 0, 0.2, 0], np.float32).astype(np.float64))
    # The kept residual is added next round: the small entries win once they have grown.
    again = compress_delta({"w": np.array([0.1, 0.0, 0.2, 0.0], np.float32)}, out.residual, CompressionSpec.parse("topk:0.5"))
    assert sorted(np.flatnonzero(decoded_values(again.tensors)["w"]).tolist()) == [0, 2]


def test_feedback_refuses_mismatched_residuals_and_non_finite_deltas() -> None:
    spec = CompressionSpec.parse("q8")
    with pytest.raises(ValueError, match="shape"):
        compress_delta({"w": np.zeros(3, np.float32)}, {"w": np.zeros(4)}, spec)
    with pytest.raises(ValueError, match="not in the delta"):
        compress_delta({"w": np.zeros(3, np.float32)}, {"x": np.zeros(3)}, spec)
    with pytest.raises(ValueError, match="non-finite"):
        compress_delta({"w": np.array([np.nan], np.float32)}, None, spec)


def test_feedback_leaves_non_float32_tensors_alone() -> None:
    out = compress_delta({"n": np.arange(3), "w": np.ones(4, np.float32)}, None, CompressionSpec.parse("topk:0.5+q8"))
    np.testing.assert_array_equal(out.tensors["n"], np.arange(3))
    assert "n" not in out.residual


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_quantise_error_is_within_half_a_step_and_codes_within_range(bits: int) -> None:
    x = np.random.default_rng(3).normal(size=1000) * 0.01
    q = quantise(x, bits=bits, block=64)
    qmax = {8: 127, 6: 31, 4: 7}[bits]
    assert np.abs(q.codes).max() <= qmax
    step = np.repeat(np.exp2(q.exponents.astype(float)), 64)[:1000]
    assert np.all(np.abs(dequantise(q) - x) <= step / 2 + 1e-12)
    assert np.all(np.abs(x) <= qmax * step)  # the scale covers the block's peak


def test_quantise_stochastic_rounding_is_unbiased() -> None:
    x = np.full(20000, 0.3)
    q = quantise(x, bits=4, block=20000, rng=np.random.default_rng(0))
    assert abs(float(dequantise(q).mean()) - 0.3) < 0.005
    assert len(set(dequantise(q).tolist())) == 2  # neighbours on the grid, not round-to-nearest


def test_quantise_zero_block_and_tiny_values() -> None:
    q = quantise(np.zeros(5), bits=8, block=4)
    assert q.exponents.tolist() == [-128, -128] and not q.codes.any()
    tiny = quantise(np.array([1e-45, 0.0]), bits=8, block=2)
    assert np.isfinite(dequantise(tiny)).all()


@pytest.mark.parametrize("count", [0, 1, 6, 7])
def test_four_bit_codes_pack_two_per_byte_and_round_trip(count: int) -> None:
    codes = np.array([-7, 7, 0, -1, 3, -4, 5][:count], np.int8)
    packed = pack_codes(codes, 4)
    assert len(packed) == (count + 1) // 2
    np.testing.assert_array_equal(unpack_codes(packed, count, 4), codes)


def test_top_k_picks_the_largest_magnitudes_lowest_index_first_on_ties() -> None:
    assert top_k_indices(np.array([1.0, -5.0, 1.0, 1.0, 4.0]), 3).tolist() == [0, 1, 4]
    assert top_k_indices(np.array([2.0, 2.0, 2.0]), 2).tolist() == [0, 1]
    assert top_k_indices(np.zeros(3), 0).tolist() == []


@pytest.mark.parametrize("text", ["none", "q8", "q4/16", "topk:0.05", "topk:0.01+q8", "topk:0.5+q4/1024", "q4+deflate",
                                  "topk:0.3+q4/64+deflate",
                                  "q6+deflate"])
def test_spec_text_round_trips(text: str) -> None:
    assert CompressionSpec.parse(text).describe() == text


@pytest.mark.parametrize("text", ["q3", "topk:0", "topk:1.5", "topk:0.1+topk:0.2", "q8+q4", "zip", "q8/0", "topk:0.1+q8/70000",
                                  "deflate", "deflate+q4", "q4+deflate+deflate", "q6", "q5+deflate"])
def test_spec_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        CompressionSpec.parse(text)
