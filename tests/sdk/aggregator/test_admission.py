"""Admission (sdk/aggregator/admission.py): the norm the validator measured is reused, and the clip scale is kept."""

from __future__ import annotations

import numpy as np

from device_agent.parameters import global_norm
from device_agent.protocol.envelope import OpenedUpdate
from device_agent.protocol.headers import MessageKind, UpdateHeader
from sdk.aggregation.influence import RoundBounds
from sdk.aggregator.admission import admit


def _opened(tensors: dict[str, np.ndarray]) -> OpenedUpdate:
    header = UpdateHeader.create(kind=MessageKind.UPDATE, fleet="f", sender="d1", region="eu", round=0,
                                 bundle_version=1, sample_count=40)
    return OpenedUpdate(header=header, tensors=tensors, sender_key_id="00" * 8)


def test_admit_with_the_validators_norm_equals_admit_measuring_it() -> None:
    rng = np.random.default_rng(5)
    opened = _opened({"w": rng.normal(size=(8, 8)).astype(np.float32)})
    base = {"w": np.zeros((8, 8), np.float32)}
    bounds = RoundBounds(clip_norm=2.0, weight_cap=10)
    measured = admit(opened, base=base, bounds=bounds, weight=40.0)
    given = admit(opened, base=base, bounds=bounds, weight=40.0, norm=global_norm(opened.tensors))
    assert given == measured
    assert measured.clipped and measured.scale == bounds.clip_scale(measured.norm) and measured.scale < 1.0
    assert measured.capped and measured.weight == 10.0


def test_admit_within_the_bound_keeps_scale_one() -> None:
    opened = _opened({"w": np.full((2, 2), 0.1, np.float32)})
    admission = admit(opened, base={"w": np.zeros((2, 2), np.float32)}, bounds=RoundBounds(clip_norm=2.0, weight_cap=100),
                      weight=40.0)
    assert admission.scale == 1.0 and not admission.clipped and not admission.capped
