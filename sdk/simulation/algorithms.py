"""The algorithms fedge offers, as (bundle training mode, FedProx mu, federated?) in one table.

Local-only trains every parameter on the device's own data and never
aggregates; FedAvg (McMahan et al., 2017) and FedProx (Li et al., 2020)
federate every parameter; FedSim and FedAlt (Pillutla et al., 2022) federate
the shared layers and keep a personal head on each device; FedFomo (Zhang et
al., 2021) replaces averaging with per-device first-order weighted
combinations of peers' shared layers (head trained with them, FedSim-style);
Ditto (Li et al., 2021) averages a global model like FedAvg while each device
also trains a personal copy of every parameter pulled towards it (weight
``lambda``) and serves the mixture of the two it chooses on its validation data.

Adding an algorithm is a row in :data:`ALGORITHMS`: ``fedge simulate``, ``fedge
bench accuracy --algorithm``, :func:`sdk.simulation.compare` and
:func:`sdk.simulation.runner.run_algorithm` read their choices from it. Behaviour
the simulator does not have yet goes behind a new field of :class:`AlgorithmSpec`
(as ``fomo`` does), defaulting to off so the existing rows keep their meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

from device_agent.bundle.manifest import TrainingMode

DEFAULT_DITTO_LAMBDA = 0.1
"""Ditto's proximal weight unless told otherwise (see docs/personalization.md for how it was chosen)."""


@dataclass(frozen=True, kw_only=True)
class AlgorithmSpec:
    """How one algorithm maps onto a bundle and the simulator."""

    name: str
    mode: TrainingMode
    default_mu: float
    federated: bool
    personal_head: bool
    straggler_policy: str
    fomo: bool = False
    default_ditto_lambda: float = 0.0


ALGORITHMS: dict[str, AlgorithmSpec] = {
    a.name: a
    for a in (
        AlgorithmSpec(name="local", mode=TrainingMode.FEDAVG, default_mu=0.0, federated=False, personal_head=False, straggler_policy="partial"),
        AlgorithmSpec(name="fedavg", mode=TrainingMode.FEDAVG, default_mu=0.0, federated=True, personal_head=False, straggler_policy="drop"),
        AlgorithmSpec(name="fedprox", mode=TrainingMode.FEDPROX, default_mu=0.01, federated=True, personal_head=False, straggler_policy="partial"),
        AlgorithmSpec(name="fedsim", mode=TrainingMode.FEDSIM, default_mu=0.0, federated=True, personal_head=True, straggler_policy="partial"),
        AlgorithmSpec(name="fedalt", mode=TrainingMode.FEDALT, default_mu=0.0, federated=True, personal_head=True, straggler_policy="partial"),
        AlgorithmSpec(name="fedfomo", mode=TrainingMode.FEDSIM, default_mu=0.0, federated=True, personal_head=True, straggler_policy="partial",
                      fomo=True),
        AlgorithmSpec(name="ditto", mode=TrainingMode.DITTO, default_mu=0.0, federated=True, personal_head=False, straggler_policy="drop",
                      default_ditto_lambda=DEFAULT_DITTO_LAMBDA),
    )
}


def algorithm(name: str) -> AlgorithmSpec:
    """The spec called ``name``; ValueError listing the choices otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose from {sorted(ALGORITHMS)}") from None
