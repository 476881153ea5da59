"""Top-k sparsification: keep the ``k`` largest-magnitude entries (Aji & Heafield, 2017; Stich et al., 2018)."""

from __future__ import annotations

import math

import numpy as np


def keep_count(size: int, fraction: float) -> int:
    """How many entries a tensor of ``size`` keeps: ``ceil(fraction * size)``, at least 1 (0 for an empty tensor)."""
    if size == 0:
        return 0
    return min(size, max(1, math.ceil(fraction * size)))


def top_k_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Ascending uint32 indices of the ``k`` largest ``|values|`` of a flat vector.

    Ties at the threshold are broken by the lower index, so the choice is a
    function of the values alone (a re-seal after a crash picks the same entries).
    """
    flat = np.asarray(values).ravel()
    if not 0 <= k <= flat.size:
        raise ValueError(f"k must be in 0..{flat.size}, got {k}")
    if flat.size >= 1 << 32:
        raise ValueError("tensors of 2**32 or more entries cannot be sparsified")
    if k == flat.size:
        return np.arange(flat.size, dtype=np.uint32)
    # Stable sort by descending magnitude: equal magnitudes keep index order.
    order = np.argsort(-np.abs(flat), kind="stable")[:k]
    return np.sort(order).astype(np.uint32)
