"""Models down as compressed deltas: the publisher's chain and the device's apply agree bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.compression import CompressionSpec
from device_agent.compression.downlink import DeltaChain, HeldModel, apply_model_delta
from device_agent.protocol.tensor_codec import decode_tensors


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"a": rng.normal(size=(33, 7)).astype(np.float32), "b": rng.normal(size=50).astype(np.float32)}


def _apply(held, step):
    return apply_model_delta(held, decode_tensors(step.payload, encoding=step.encoding), round=step.result.round,
                             base_round=step.base.round, base_digest=step.base.digest, digest=step.result.digest)


@pytest.mark.parametrize("text", ["q8", "q4", "topk:0.2+q4", "topk:0.5", "q4+deflate", "q6+deflate"])
def test_devices_that_apply_every_delta_hold_the_publishers_model_bit_for_bit(text):
    rng = np.random.default_rng(0)
    target = _model(rng)
    chain = DeltaChain(CompressionSpec.parse(text))
    assert chain.advance(0, target) is None  # the first model goes out in full
    device = HeldModel.of(0, chain.held.tensors)
    for r in range(1, 8):
        target = {n: (v + 0.05 * rng.normal(size=v.shape)).astype(np.float32) for n, v in target.items()}
        step = chain.advance(r, target)
        applied = _apply(device, step)
        assert applied.reason is None, applied.detail
        device = applied.model
        assert device.digest == chain.held.digest and device.round == r
        for n in target:
            assert np.array_equal(device.tensors[n], chain.held.tensors[n])
    # error feedback: the held model tracks the target (the gap stays about one round's compression error)
    gap = max(float(np.max(np.abs(device.tensors[n] - target[n]))) for n in target)
    assert gap < 0.5


def test_error_feedback_closes_the_gap_once_the_target_stops_moving():
    rng = np.random.default_rng(1)
    target = _model(rng)
    chain = DeltaChain(CompressionSpec.parse("topk:0.1+q8"))
    chain.advance(0, {n: np.zeros_like(v) for n, v in target.items()})
    gaps = []
    for r in range(1, 40):
        chain.advance(r, target)
        gaps.append(max(float(np.max(np.abs(chain.held.tensors[n] - target[n]))) for n in target))
    assert gaps[-1] < gaps[0] / 50


def test_a_device_without_the_base_or_with_another_one_is_told_why():
    rng = np.random.default_rng(2)
    chain = DeltaChain(CompressionSpec.parse("q4"))
    m0 = _model(rng)
    chain.advance(0, m0)
    step1 = chain.advance(1, {n: v + np.float32(0.3) for n, v in m0.items()})
    step2 = chain.advance(2, {n: v + np.float32(0.6) for n, v in m0.items()})
    assert _apply(None, step1).reason == "no_base"
    missed = _apply(HeldModel.of(0, m0), step2)  # it missed round 1
    assert missed.reason == "base_mismatch" and "round 1" in missed.detail
    other = HeldModel.of(1, {n: v + np.float32(0.3) for n, v in m0.items()})  # right round, the true model
    assert other.digest != step1.result.digest
    assert _apply(other, step2).reason == "base_mismatch"


def test_a_nan_a_wrong_shape_or_a_wrong_digest_is_refused():
    rng = np.random.default_rng(3)
    chain = DeltaChain(CompressionSpec.parse("q8"))
    m0 = _model(rng)
    chain.advance(0, m0)
    base = HeldModel.of(0, chain.held.tensors)
    step = chain.advance(1, {n: v * 2 for n, v in m0.items()})
    delta = decode_tensors(step.payload, encoding=step.encoding)
    kwargs = dict(round=1, base_round=0, base_digest=base.digest, digest=step.result.digest)
    bad = dict(delta, a=np.full_like(delta["a"], np.nan))
    assert apply_model_delta(base, bad, **kwargs).reason == "non_finite"
    huge = dict(delta, a=np.full_like(delta["a"], 3e38))
    big_base = HeldModel.of(0, dict(base.tensors, a=np.full_like(base.tensors["a"], 3e38)))
    assert apply_model_delta(big_base, huge, **dict(kwargs, base_digest=big_base.digest)).reason == "non_finite"
    assert apply_model_delta(base, dict(delta, a=delta["a"][:3]), **kwargs).reason == "shape"
    assert apply_model_delta(base, delta, **dict(kwargs, digest=bytes(32))).reason == "digest"
    assert apply_model_delta(base, delta, **kwargs).reason is None


def test_the_chain_restarts_on_a_new_layout_a_non_finite_target_or_no_progress():
    rng = np.random.default_rng(4)
    chain = DeltaChain(CompressionSpec.parse("q8"))
    m0 = _model(rng)
    chain.advance(3, m0)
    assert chain.advance(3, m0) is None and chain.held.round == 3  # same round again: full
    assert chain.advance(4, {"a": m0["a"]}) is None and set(chain.held.tensors) == {"a"}
    assert chain.advance(5, {"a": np.full_like(m0["a"], np.inf)}) is None
    with pytest.raises(ValueError):
        DeltaChain(CompressionSpec.parse("none"))
