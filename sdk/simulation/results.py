"""What a simulation run reports: per-round metrics and the whole run's result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdk.datasets.holdout import ValidationSplit


@dataclass(frozen=True, kw_only=True)
class RoundMetrics:
    """Metrics of one round. Accuracies are per device on its own test split.

    ``global_accuracy`` is empty for local-only and FedFomo (no server
    model); ``regional_accuracy`` is empty without a hierarchy.
    ``fomo_combined``: devices that weighed peers this round (FedFomo only);
    ``fomo_kept_own``: those of them for which no peer helped, so they kept
    only their own model.
    ``pooled_accuracy`` is correct / examples over every device's test split
    (PFLlib's figure); ``mean_accuracy`` the unweighted mean over devices.
    """

    round_number: int
    selected: tuple[str, ...]
    aggregated: tuple[str, ...]
    dropped: dict[str, str]
    personalised_accuracy: dict[str, float]
    mean_accuracy: float
    pooled_accuracy: float
    global_accuracy: dict[str, float]
    regional_accuracy: dict[str, float]
    bytes_up_per_device: int
    bytes_down_per_device: int
    seconds: float
    fomo_combined: tuple[str, ...] = ()
    fomo_kept_own: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class SimulationResult:
    """Everything a run produced; ``final_accuracy`` is per device after the last round.

    ``fine_tuned_accuracy`` maps ``"head"``/``"all"`` to per-device accuracy
    after local fine-tuning of the final model (only with ``finetune_epochs``).
    ``validation`` says which clients got a validation split made from their
    training data (None: the simulator was not asked to make any).
    """

    rounds: tuple[RoundMetrics, ...]
    final_accuracy: dict[str, float]
    global_params: dict[str, np.ndarray] = field(repr=False)
    fine_tuned_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    test_examples: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    validation: ValidationSplit | None = field(default=None, repr=False)

    @property
    def mean_final_accuracy(self) -> float:
        """Unweighted mean over devices of the final personalised test accuracy."""
        return float(np.mean(list(self.final_accuracy.values())))

    @property
    def fomo_kept_own_rate(self) -> dict[str, float]:
        """FedFomo: per device, the share of its combine steps in which it kept only its own model; empty otherwise."""
        steps: dict[str, int] = {}
        kept: dict[str, int] = {}
        for r in self.rounds:
            for cid in r.fomo_combined:
                steps[cid] = steps.get(cid, 0) + 1
            for cid in r.fomo_kept_own:
                kept[cid] = kept.get(cid, 0) + 1
        return {cid: kept.get(cid, 0) / n for cid, n in steps.items()}

    @property
    def fomo_kept_own_overall(self) -> float | None:
        """FedFomo: the share of all combine steps (every device, every round) that kept only the own model; None otherwise."""
        steps = sum(len(r.fomo_combined) for r in self.rounds)
        return sum(len(r.fomo_kept_own) for r in self.rounds) / steps if steps else None

    def to_json_dict(self) -> dict[str, Any]:
        """Every per-round and final figure as plain JSON-able data (parameters left out)."""
        v = self.validation
        return {
            "final_accuracy": self.final_accuracy,
            "mean_final_accuracy": self.mean_final_accuracy if self.final_accuracy else None,
            "rounds": [
                {"round": r.round_number, "mean_accuracy": r.mean_accuracy, "accuracy": r.personalised_accuracy,
                 "pooled_accuracy": r.pooled_accuracy, "global_accuracy": r.global_accuracy,
                 "regional_accuracy": r.regional_accuracy, "aggregated": list(r.aggregated), "dropped": r.dropped,
                 "bytes_up_per_device": r.bytes_up_per_device, "bytes_down_per_device": r.bytes_down_per_device,
                 "fomo_combined": list(r.fomo_combined), "fomo_kept_own": list(r.fomo_kept_own), "seconds": r.seconds}
                for r in self.rounds
            ],
            "fine_tuned_accuracy": self.fine_tuned_accuracy,
            "fomo_kept_own": {"per_device": self.fomo_kept_own_rate, "overall": self.fomo_kept_own_overall},
            "validation": None if v is None else {"fraction": v.fraction, "seed": v.seed, "held_out": v.held_out,
                                                  "note": v.describe()},
            "test_examples": self.test_examples,
            "seconds": self.seconds,
        }
