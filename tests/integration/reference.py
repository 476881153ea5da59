"""The numpy reference of the default, bounded aggregation (docs/security.md), written out independently of sdk/.

Per region and round ``r``: weight ``w_k = min(n_k, cap_r)`` and delta
``d_k * min(1, B_r / ||d_k||)``. Round 0: ``B_0 = 1.0``, ``cap_0 = 1``. After
a round with at least 3 updates: ``B = median ||d||``, ``cap = floor(median
n)`` (at most 100,000); otherwise the bounds carry over. The root adds
``sum_j N_j D_j / sum_j N_j`` with ``N_j = sum_k w_k``, which equals the
bounded weighted mean over every device of every region.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

#: (sample_count, delta) of one device's update.
Update = tuple[int, Mapping[str, np.ndarray]]


def l2(delta: Mapping[str, np.ndarray]) -> float:
    """The L2 norm over every tensor, in float64."""
    return math.sqrt(sum(float(np.sum(np.asarray(v, dtype=np.float64) ** 2)) for v in delta.values()))


def default_bounds(updates_by_round: Mapping[int, Sequence[Update]], rounds: int) -> dict[int, tuple[float, int]]:
    """round -> (norm bound, weight cap) of one region under the default policy, from the updates it accepted."""
    clip, cap = 1.0, 1
    bounds: dict[int, tuple[float, int]] = {}
    for r in range(rounds):
        bounds[r] = (clip, cap)
        updates = updates_by_round.get(r, ())
        if len(updates) >= 3:
            estimate = float(np.median([l2(d) for _, d in updates]))
            if estimate > 0:
                clip = estimate
            cap = max(1, min(100_000, math.floor(float(np.median([n for n, _ in updates])))))
    return bounds


def bounded_sum(updates: Sequence[Update], bounds: tuple[float, int]) -> tuple[dict[str, np.ndarray], int]:
    """(sum_k w_k clip(d_k) in float64, sum_k w_k) of one region's round."""
    clip, cap = bounds
    total = 0
    acc: dict[str, np.ndarray] = {}
    for samples, delta in updates:
        weight = min(samples, cap)
        norm = l2(delta)
        scale = 1.0 if norm <= clip else clip / norm
        for name, value in delta.items():
            acc[name] = acc.get(name, 0.0) + weight * np.asarray(value, dtype=np.float64) * scale
        total += weight
    return acc, total


def global_steps(by_region: Mapping[str, Mapping[int, Sequence[Update]]], rounds: int) -> dict[int, dict[str, np.ndarray]]:
    """round -> G_{r+1} - G_r under the default bounds (every region's bounds from its own history)."""
    bounds = {region: default_bounds(history, rounds) for region, history in by_region.items()}
    steps: dict[int, dict[str, np.ndarray]] = {}
    for r in range(rounds):
        acc: dict[str, np.ndarray] = {}
        total = 0
        for region, history in by_region.items():
            part, weight = bounded_sum(history.get(r, ()), bounds[region][r])
            for name, value in part.items():
                acc[name] = acc.get(name, 0.0) + value
            total += weight
        steps[r] = {name: value / total for name, value in acc.items()}
    return steps


def region_weight(updates: Sequence[Update], bounds: tuple[float, int]) -> int:
    """``N_j``: what a region reports as its sample count (the sum of bounded weights)."""
    return sum(min(n, bounds[1]) for n, _ in updates)
