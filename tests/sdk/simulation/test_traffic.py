"""The simulated uplink and downlink: the device's compression, the codec's bytes, what the server folds."""

from __future__ import annotations

import numpy as np

from device_agent.compression import CompressionSpec
from sdk.simulation.traffic import Downlink, Uplink


def _deltas(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": (rng.laplace(size=(64, 32)) * 1e-3).astype(np.float32), "b": (rng.normal(size=32) * 1e-3).astype(np.float32)}


def test_deflate_sends_fewer_bytes_and_the_server_folds_the_same_values() -> None:
    plain, deflated = Uplink(CompressionSpec.parse("q4")), Uplink(CompressionSpec.parse("q4+deflate"))
    for round_number in range(3):  # the residual carries over identically: deflate is lossless
        delta = _deltas(round_number)
        (a, size_a), (b, size_b) = plain.send("dev", delta), deflated.send("dev", delta)
        assert size_b < size_a
        for name in delta:
            np.testing.assert_array_equal(a[name], b[name])


def test_downlink_q6_holds_the_server_model_closer_than_q4() -> None:
    start = {n: np.zeros_like(v) for n, v in _deltas(0).items()}
    target = _deltas(1)
    gaps = {}
    for text in ("q4+deflate", "q6+deflate"):
        link = Downlink(start, CompressionSpec.parse(text))
        held = link.publish(target)
        gaps[text] = max(float(np.abs(held[n] - target[n]).max()) for n in target)
        assert 0 < link.last_bytes < link.full_bytes
    assert 0 < gaps["q6+deflate"] < gaps["q4+deflate"] / 3
