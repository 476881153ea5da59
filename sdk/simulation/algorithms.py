"""The algorithms fedge offers, as (bundle training mode, FedProx mu, federated?) in one table.

Local-only trains every parameter on the device's own data and never
aggregates; FedAvg (McMahan et al., 2017) and FedProx (Li et al., 2020)
federate every parameter; FedSim and FedAlt (Pillutla et al., 2022) federate
the shared layers and keep a personal head on each device; FedFomo (Zhang et
al., 2021) replaces averaging with per-device first-order weighted
combinations of peers' shared layers (head trained with them, FedSim-style).

Adding an algorithm is a row in :data:`ALGORITHMS`: ``fedge simulate``, ``fedge
bench accuracy --algorithm``, :func:`sdk.simulation.compare` and
:func:`sdk.simulation.runner.run_algorithm` read their choices from it. Behaviour
the simulator does not have yet goes behind a new field of :class:`AlgorithmSpec`
(as ``fomo`` does), defaulting to off so the existing rows keep their meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

from device_agent.bundle.manifest import TrainingMode


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
    )
}


def algorithm(name: str) -> AlgorithmSpec:
    """The spec called ``name``; ValueError listing the choices otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose from {sorted(ALGORITHMS)}") from None
