"""What a simulation run reports: per-round metrics and the whole run's result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from sdk.datasets.holdout import ValidationSplit
from sdk.simulation.cold_start import NewcomerResult


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
    Ditto only (empty otherwise): ``personal_model_accuracy``, the personal model
    alone (``personalised_accuracy`` is the mixture the device chose), and
    ``serving_weight``, each device's weight on its personal model after the round.
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
    personal_model_accuracy: dict[str, float] = field(default_factory=dict)
    serving_weight: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Every field as plain JSON-able data (:meth:`from_json` reads it back)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundMetrics:
        """The record :meth:`to_json` wrote (tuples come back as tuples; unknown keys are ignored)."""
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        for name in ("selected", "aggregated", "fomo_combined", "fomo_kept_own"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class SimulationResult:
    """Everything a run produced; ``final_accuracy`` is per device after the last round.

    ``fine_tuned_accuracy`` maps ``"head"``/``"all"`` to per-device accuracy
    after local fine-tuning of the final model (only with ``finetune_epochs``).
    ``validation`` says which clients got a validation split made from their
    training data (None: the simulator was not asked to make any).
    ``cold_start``: how newcomers fared joining the fleet (empty without ``SimulationConfig.cold_start``).
    With ``choice_epochs`` (:mod:`sdk.simulation.local_choice`): ``candidate_accuracy`` has ``"FT(head)"``/``"FT(all)"``
    (fine-tuning with early stopping) and ``"local+served"``, ``"local+FT(head)"``... (even ensembles with a local model); per choice rule (``"ties to local"``, ``"ties by loss"``), ``chosen_model`` names what
    each device kept on validation (``local``, ``served``, ``FT(head)``, ``FT(all)``) and
    ``chosen_accuracy`` is its test accuracy.
    """

    rounds: tuple[RoundMetrics, ...]
    final_accuracy: dict[str, float]
    global_params: dict[str, np.ndarray] = field(repr=False)
    fine_tuned_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    test_examples: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    validation: ValidationSplit | None = field(default=None, repr=False)
    cold_start: tuple[NewcomerResult, ...] = ()
    candidate_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    chosen_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    chosen_model: dict[str, dict[str, str]] = field(default_factory=dict)

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
                 "fomo_combined": list(r.fomo_combined), "fomo_kept_own": list(r.fomo_kept_own), "seconds": r.seconds,
                 "personal_model_accuracy": r.personal_model_accuracy, "serving_weight": r.serving_weight}
                for r in self.rounds
            ],
            "fine_tuned_accuracy": self.fine_tuned_accuracy,
            "fomo_kept_own": {"per_device": self.fomo_kept_own_rate, "overall": self.fomo_kept_own_overall},
            "validation": None if v is None else {"fraction": v.fraction, "seed": v.seed, "held_out": v.held_out,
                                                  "note": v.describe()},
            "test_examples": self.test_examples,
            "seconds": self.seconds,
            "cold_start": [asdict(c) for c in self.cold_start],
            "candidate_accuracy": self.candidate_accuracy,
            "chosen_accuracy": self.chosen_accuracy,
            "chosen_model": self.chosen_model,
        }
