"""How a simulated federation runs: the simulator's configuration, validated where it is made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from device_agent.compression import NO_COMPRESSION, CompressionSpec
from device_agent.trainer import TrainBudget
from sdk.aggregation import AggregationConfig
from sdk.aggregation.mixing import RegionWeighting
from sdk.datasets.holdout import DEFAULT_VALIDATION_FRACTION
from sdk.simulation.cold_start import ColdStartConfig


@dataclass(frozen=True, kw_only=True)
class HierarchyConfig:
    """Two-tier aggregation over the clients' regions.

    ``regional_weight`` (a): each region serves a * its regional model +
    (1 - a) * the global one; 0 is hierarchical FedAvg. ``region_weighting``:
    the root combines regional aggregates by ``"samples"`` or ``"uniform"``.
    """

    regional_weight: float = 0.5
    region_weighting: RegionWeighting = "samples"

    def __post_init__(self) -> None:
        if not 0.0 <= self.regional_weight <= 1.0:
            raise ValueError("regional_weight must be in [0, 1]")
        if self.region_weighting not in ("samples", "uniform"):
            raise ValueError("region_weighting must be 'samples' or 'uniform'")



@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    """How a simulated federation runs.

    ``federated=False`` is the local-only baseline: devices train on their own
    data every round and nothing is aggregated. ``validation_fraction``: the
    share of a client's training examples held out as its validation split
    when the data has none (0: make none). ``compression``: how devices
    compress their deltas (the device's own code, error feedback);
    ``downlink_compression``: how the server sends model deltas down
    (simulated, flat averaging only): :mod:`sdk.simulation.traffic`.
    ``choice_epochs`` > 0: after the last round each device also fine-tunes with
    early stopping on its validation split (at most this many epochs), trains a
    local-only model, and keeps the candidate that scores best on validation,
    ties to the local model (see :meth:`FederatedSimulator` docs).
    """

    rounds: int
    budget: TrainBudget = TrainBudget()
    participation: float = 1.0
    straggler_fraction: float = 0.0
    straggler_work: float = 0.5
    straggler_policy: Literal["drop", "partial"] = "partial"
    dropout_fraction: float = 0.0
    aggregation: AggregationConfig = AggregationConfig()
    federated: bool = True
    fomo_candidates: int | None = None
    hierarchy: HierarchyConfig | None = None
    finetune_epochs: int = 0
    choice_epochs: int = 0
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    seed: int = 0
    cold_start: ColdStartConfig | None = None
    compression: CompressionSpec = NO_COMPRESSION
    downlink_compression: CompressionSpec = NO_COMPRESSION

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0")
        for name in ("participation", "straggler_fraction", "straggler_work", "dropout_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.participation == 0:
            raise ValueError("participation must be > 0")
        if self.fomo_candidates is not None and self.fomo_candidates < 1:
            raise ValueError("fomo_candidates must be >= 1")
        if self.straggler_policy not in ("drop", "partial"):
            raise ValueError("straggler_policy must be 'drop' or 'partial'")
        if self.finetune_epochs < 0 or self.choice_epochs < 0:
            raise ValueError("finetune_epochs and choice_epochs must be >= 0")
        if self.choice_epochs and (not self.federated or self.fomo_candidates is not None or self.hierarchy is not None):
            raise ValueError("choice_epochs applies to flat averaging runs (a local-only run is the fallback itself)")
        if self.hierarchy is not None and (self.fomo_candidates is not None or not self.federated):
            raise ValueError("hierarchy applies to averaging algorithms, not to local-only or FedFomo")
        if self.cold_start is not None and max(self.cold_start.join_rounds) > self.rounds:
            raise ValueError("cold_start.join_rounds must not exceed rounds")
        if self.compression.enabled and self.fomo_candidates is not None:
            raise ValueError("compression applies to averaged deltas; FedFomo uploads whole models")
        if self.downlink_compression.enabled and (self.hierarchy is not None or self.fomo_candidates is not None):
            raise ValueError("downlink_compression is simulated for flat averaging only")
