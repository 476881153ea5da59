"""Carrying parameters across bundle versions: by name, where the shapes match (pure).

Used three times with one rule: a device keeps its personal head, a device
starts the new version's shared layers from its last global model (for a
``carry`` release), and the root starts the new version's first global model
from the old one. Everything else starts from the new bundle's own weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Carried:
    """The parameters for the new version, and which names were ``kept`` (carried over) or ``reset`` (new bundle's)."""

    params: dict[str, np.ndarray]
    kept: tuple[str, ...]
    reset: tuple[str, ...]

    def summary(self) -> str:
        """One line: what was kept and what was reset."""
        return (f"kept {len(self.kept)} ({', '.join(self.kept) or '-'}), "
                f"reset {len(self.reset)} ({', '.join(self.reset) or '-'})")


def carry_parameters(old: Mapping[str, np.ndarray], new_initial: Mapping[str, np.ndarray]) -> Carried:
    """For each name of ``new_initial``: ``old``'s array when it has that name with the same shape and finite values,
    else the new initial array. Names only in ``old`` are dropped."""
    params: dict[str, np.ndarray] = {}
    kept: list[str] = []
    reset: list[str] = []
    for name, initial in new_initial.items():
        value = old.get(name)
        if value is not None and np.shape(value) == np.shape(initial) and np.all(np.isfinite(value)):
            params[name] = np.array(value, dtype=np.asarray(initial).dtype)
            kept.append(name)
        else:
            params[name] = np.array(initial, copy=True)
            reset.append(name)
    return Carried(params=params, kept=tuple(kept), reset=tuple(reset))
