"""Aggregation math for fedge's regional and root aggregators and the in-process simulator.

Pure numpy in, numpy out, no I/O: parameter dicts (name -> array, shared
layers only) go in, float32 parameter dicts come out. ``None`` results mean
"no update this round: keep the previous global model".

- :mod:`~sdk.aggregation.weighted_mean`: streaming FedAvg mean, O(model) memory, persistable state.
- :mod:`~sdk.aggregation.robust`: norm clipping, coordinate-wise median, trimmed mean.
- :mod:`~sdk.aggregation.mixing`: regional/global interpolation and the root's region combination.
- :mod:`~sdk.aggregation.strategy`: the rule a regional aggregator picks from its config.
"""

from __future__ import annotations

from sdk.aggregation.mixing import RegionWeighting, combine_regions, mix_regional
from device_agent.parameters import (
    Layout,
    ParameterDict,
    check_finite,
    check_layout,
    check_update,
    global_norm,
    layout_of,
)
from sdk.aggregation.robust import ClippedDelta, clip_by_norm, coordinate_median, trimmed_mean
from sdk.aggregation.strategy import (
    AggregationConfig,
    AggregationRule,
    MeanRule,
    MedianRule,
    TrimmedMeanRule,
    make_rule,
)
from sdk.aggregation.weighted_mean import StreamingWeightedMean, WeightedMeanState, weighted_mean

__all__ = [
    "AggregationConfig",
    "AggregationRule",
    "ClippedDelta",
    "Layout",
    "MeanRule",
    "MedianRule",
    "ParameterDict",
    "RegionWeighting",
    "StreamingWeightedMean",
    "TrimmedMeanRule",
    "WeightedMeanState",
    "check_finite",
    "check_layout",
    "check_update",
    "clip_by_norm",
    "combine_regions",
    "coordinate_median",
    "global_norm",
    "layout_of",
    "make_rule",
    "mix_regional",
    "trimmed_mean",
    "weighted_mean",
]
