"""PeerAffinity: FedFomo's affinity keyed by peer id."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.personalization.peer_affinity import PeerAffinity


def test_peer_affinity_update_adds_weights_and_learns_new_peers() -> None:
    affinity = PeerAffinity()
    affinity.update(["b", "a"], [0.25, 0.75])
    affinity.update(["c", "a"], [1.0, 0.0])
    assert affinity.scores == {"a": 0.75, "b": 0.25, "c": 1.0}
    with pytest.raises(ValueError):
        affinity.update(["a", "a"], [0.5, 0.5])


def test_peer_affinity_prefers_the_best_known_peers_and_never_useless_ones() -> None:
    affinity = PeerAffinity()
    assert affinity.prefer(3, round_index=0, rng=np.random.default_rng(0)) == []
    affinity.update(["a", "b", "c", "d"], [0.1, 0.6, 0.3, 0.0])
    # Late rounds have epsilon 0: purely greedy, by descending affinity; "d" never helped, so it is left to the region.
    assert affinity.prefer(2, round_index=10, rng=np.random.default_rng(0)) == ["b", "c"]
    assert affinity.prefer(4, round_index=10, rng=np.random.default_rng(0)) == ["b", "c", "a"]
    assert affinity.prefer(0, round_index=10, rng=np.random.default_rng(0)) == []


def test_peer_affinity_forgets_the_lowest_scores_beyond_max_peers() -> None:
    affinity = PeerAffinity(max_peers=2)
    affinity.update(["a", "b", "c"], [0.5, 0.1, 0.4])
    assert affinity.scores == {"a": 0.5, "c": 0.4}
