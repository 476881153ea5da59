"""FedFomo's affinity vector keyed by peer id, for a device that meets its peers through a server.

In the simulator every device knows every peer's index; a deployed device
only learns peer ids as its region serves them. :class:`PeerAffinity` keeps
P_i as ``peer id -> score`` and maps it onto the pure functions of
:mod:`device_agent.personalization.fedfomo` (Zhang et al., ICLR 2021):
:meth:`PeerAffinity.prefer` runs :func:`select_candidates` over the known
peers, :meth:`PeerAffinity.update` runs :func:`update_affinity`. Adaptation:
only peers whose affinity is positive are asked for by name; the region
fills the other slots with random peers, which is where exploration of
not-yet-known peers comes from. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from device_agent.personalization.fedfomo import Vector, exploration_rate, select_candidates, update_affinity


class PeerAffinity:
    """Affinity per peer id; at most ``max_peers`` are kept (the lowest scores are forgotten first)."""

    def __init__(self, *, max_peers: int = 1024) -> None:
        if max_peers < 1:
            raise ValueError("max_peers must be >= 1")
        self.max_peers = max_peers
        self.scores: dict[str, float] = {}

    def prefer(self, k: int, *, round_index: int, rng: np.random.Generator) -> list[str]:
        """Up to ``k`` known peers with positive affinity, epsilon-greedy for ``round_index``; empty when none is known."""
        ids = sorted(self.scores)
        if not ids or k < 1:
            return []
        picked = select_candidates([self.scores[p] for p in ids], k=k, epsilon=exploration_rate(round_index), rng=rng)
        return [ids[int(i)] for i in picked if self.scores[ids[int(i)]] > 0]

    def update(self, peers: Sequence[str], weights: Vector) -> None:
        """Add ``weights[n]`` to the affinity of ``peers[n]`` (new peers start at 0); peers must be distinct."""
        for peer in peers:
            self.scores.setdefault(peer, 0.0)
        ids = sorted(self.scores)
        index = {peer: i for i, peer in enumerate(ids)}
        new = update_affinity([self.scores[p] for p in ids], [index[p] for p in peers], weights)
        self.scores = {peer: float(v) for peer, v in zip(ids, new)}
        if len(self.scores) > self.max_peers:
            keep = sorted(self.scores, key=lambda p: (-self.scores[p], p))[: self.max_peers]
            self.scores = {p: self.scores[p] for p in sorted(keep)}
