"""On-device personalization math (numpy only; never torch or onnx).

- :mod:`~device_agent.personalization.fedfomo`: FedFomo (Zhang et al., ICLR 2021)
  weights over peer models and epsilon-greedy choice of which peers to ask for.
- :mod:`~device_agent.personalization.model_choice`: the per-device choice of
  what to serve, a mixture of the personal and the global model's outputs
  (APFL-style weight, Deng et al. 2020) picked on the device's validation data.
- :mod:`~device_agent.personalization.model_select`: keeping one of several candidate
  models on validation, ties to a fallback (the device's local model), and early stopping.
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
from device_agent.personalization.model_choice import (
    DEFAULT_ALPHAS,
    CandidateScore,
    MixtureChoice,
    choose_mixture,
    mix_outputs,
)
from device_agent.personalization.model_select import ModelChoice, ModelScore, best_index, choose_model, early_stop_epoch

__all__ = [
    "ModelChoice",
    "ModelScore",
    "best_index",
    "choose_model",
    "early_stop_epoch",
    "DEFAULT_ALPHAS",
    "CandidateScore",
    "MixtureChoice",
    "choose_mixture",
    "mix_outputs",
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
