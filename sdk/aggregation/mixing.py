"""Hierarchical, cluster-aware mixing: regional models against the global one.

fedge aggregates in two tiers (device -> region -> root), as in HierFAVG (Liu
et al., "Client-Edge-Cloud Hierarchical Federated Learning", ICC 2020). The
root combines the regional aggregates (:func:`combine_regions`), by sample
count (which equals one flat FedAvg over every device) or uniformly (every
region counts once, so a populous region cannot drown out the others).

With cluster-aware mixing on, each region then serves its devices an
interpolation of its own regional model and the global one
(:func:`mix_regional`): the model-interpolation scheme of Mansour et al.,
"Three Approaches for Personalization with Applications to Federated
Learning" (arXiv:2002.10619, 2020), applied to a region (a cluster of similar
devices) instead of a single client. ``regional_weight`` 1 keeps the regional
model, 0 the global one.

Both operations are linear, so they apply to models and to deltas alike.
All results are float32; ``None`` results mean "no update: keep the previous
global model".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from device_agent.parameters import ParameterDict, as_float32, check_update, check_weight
from sdk.aggregation.weighted_mean import StreamingWeightedMean

RegionWeighting = Literal["samples", "uniform"]


def mix_regional(
    regional: ParameterDict | None, global_: ParameterDict, *, regional_weight: float
) -> dict[str, np.ndarray]:
    """``regional_weight * regional + (1 - regional_weight) * global_``, parameter by parameter.

    ``regional`` None (the region has no model of its own yet, e.g. it
    accepted nothing) gives a float32 copy of ``global_``. Raises
    ``ValueError`` unless ``0 <= regional_weight <= 1``, and when the two
    layouts differ or a value is not finite.
    """
    a = check_weight(regional_weight, what="regional_weight")
    if a > 1.0:
        raise ValueError(f"regional_weight must be in [0, 1], got {a}")
    layout = check_update(None, global_, what="global model")
    if regional is None:
        return {name: as_float32(value).copy() for name, value in global_.items()}
    check_update(layout, regional, what="regional model")
    return {
        name: as_float32(a * np.asarray(regional[name], dtype=np.float64) + (1.0 - a) * np.asarray(g, dtype=np.float64))
        for name, g in global_.items()
    }


def combine_regions(
    region_means: Sequence[ParameterDict | None],
    region_weights: Sequence[float],
    *,
    by: RegionWeighting = "samples",
) -> dict[str, np.ndarray] | None:
    """The root's combination of regional aggregates, or None when no region contributes.

    ``region_weights`` are the regions' accepted sample counts. ``by="samples"``
    weights each region mean by its count; ``by="uniform"`` gives every
    region with a positive count the same weight. A region with count 0
    contributes nothing in either mode, and may pass ``None`` as its mean.
    One contributing region gives its own mean back (as float32). No region,
    or all counts 0, gives None: "keep the previous global model".

    Raises ``ValueError`` for mismatched lengths, an unknown ``by``, a
    negative or non-finite count, a ``None`` mean with a positive count, or
    region means whose layouts differ.
    """
    if by not in ("samples", "uniform"):
        raise ValueError(f"by must be 'samples' or 'uniform', got {by!r}")
    if len(region_means) != len(region_weights):
        raise ValueError(f"{len(region_means)} region means but {len(region_weights)} region weights")
    acc = StreamingWeightedMean()
    for i, (mean, raw_weight) in enumerate(zip(region_means, region_weights)):
        weight = check_weight(raw_weight, what=f"region_weights[{i}]")
        if weight == 0.0:
            continue
        if mean is None:
            raise ValueError(f"region {i} has weight {weight} but no mean")
        acc.accumulate(mean, weight if by == "samples" else 1.0)
    return acc.finalize()
