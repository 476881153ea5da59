"""On-device personalization math (numpy only; never torch or onnx).

- :mod:`~device_agent.personalization.fedfomo`: FedFomo (Zhang et al., ICLR 2021)
  weights over peer models and epsilon-greedy choice of which peers to ask for.
"""

from __future__ import annotations

from device_agent.personalization.fedfomo import (
    FomoUpdate,
    exploration_rate,
    fomo_delta,
    fomo_scores,
    fomo_update,
    fomo_weights,
    parameter_distance,
    select_candidates,
    update_affinity,
)

__all__ = [
    "FomoUpdate",
    "exploration_rate",
    "fomo_delta",
    "fomo_scores",
    "fomo_update",
    "fomo_weights",
    "parameter_distance",
    "select_candidates",
    "update_affinity",
]
