"""Compressed device updates at a real regional aggregator: folded as what they decode to, validated as that."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from device_agent.compression import CompressionSpec, compress_delta, decoded_values
from sdk.aggregator import RegionalAggregator, Verdict
from tests.sdk.aggregator import scenario


@pytest.mark.parametrize("text", ["topk:0.3+q8", "q4", "topk:0.5", "q6+deflate", "topk:0.3+q4+deflate"])
def test_compressed_updates_fold_to_the_numpy_mean_of_their_decoded_values(text: str, region: RegionalAggregator) -> None:
    spec = CompressionSpec.parse(text)
    updates = scenario.device_updates(count=5, seed=3)
    decoded = []
    for update in updates:
        tensors = compress_delta(update.delta, None, spec).tensors
        handled = region.handle_update(scenario.seal(update, delta=tensors, encoding=spec.encoding), topic_device=update.device)
        assert handled.verdict is Verdict.ACCEPTED, handled.reason
        decoded.append(replace(update, delta=decoded_values(tensors)))
    aggregate = region.close_round()
    expected = scenario.reference_mean(decoded)
    assert aggregate.mean_delta is not None
    for name in expected:
        np.testing.assert_allclose(aggregate.mean_delta[name], expected[name], rtol=1e-6, atol=1e-7)
    # Compression changed the updates (the test would pass trivially otherwise).
    assert any(not np.array_equal(d.delta[n], u.delta[n]) for d, u in zip(decoded, updates) for n in u.delta)


def test_compressed_update_is_validated_as_what_it_decodes_to(region: RegionalAggregator) -> None:
    spec = CompressionSpec.parse("topk:0.1+q4")
    update = scenario.device_updates(count=1)[0]
    huge = {name: np.full(shape, 100.0, dtype=np.float32) for name, (shape, _) in scenario.SPEC.items()}
    sealed = scenario.seal(update, delta=compress_delta(huge, None, spec).tensors, encoding=spec.encoding)
    handled = region.handle_update(sealed, topic_device=update.device)
    assert (handled.verdict, handled.reason) == (Verdict.REJECTED, "norm")
