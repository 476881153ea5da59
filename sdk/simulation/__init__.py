"""In-process federated simulation with real ORT training per device (no broker).

:func:`compare` runs several algorithms on your per-client arrays and model
and returns a :class:`ResultsTable` (see :mod:`sdk.simulation.comparison`);
:class:`~sdk.simulation.simulator.FederatedSimulator` is the engine under it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AlgorithmResult", "ResultsTable", "compare"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI imports sdk.simulation.algorithms at start-up, which must not pull in torch or onnxruntime.
    if name in __all__:
        from sdk.simulation import comparison

        return getattr(comparison, name)
    raise AttributeError(f"module 'sdk.simulation' has no attribute {name!r}")
