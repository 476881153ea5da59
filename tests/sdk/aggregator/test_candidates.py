"""CandidatePool: FedFomo's per-device latest models and which of them a device is served."""

from __future__ import annotations

import numpy as np
import pytest

from sdk.aggregator.candidates import CandidatePool


def _params(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, dtype=np.float64), "b": np.full(3, value, dtype=np.float32)}


def _pool(*devices: str) -> CandidatePool:
    pool = CandidatePool()
    for i, device in enumerate(devices):
        pool.record(device, 0, _params(float(i)))
    return pool


def test_candidates_record_keeps_a_float32_copy_of_the_newest_round() -> None:
    pool = CandidatePool()
    params = _params(1.0)
    assert pool.record("a", 3, params)
    params["w"][:] = 9.0  # the pool holds a copy
    held = pool.get("a")
    assert held is not None and held.round == 3 and held.params["w"].dtype == np.float32
    np.testing.assert_array_equal(held.params["w"], np.ones((2, 3), dtype=np.float32))
    assert not pool.record("a", 2, _params(5.0))  # older: ignored
    assert pool.get("a").params["b"][0] == 1.0  # type: ignore[union-attr]
    assert pool.record("a", 3, _params(4.0)) and pool.get("a").params["b"][0] == 4.0  # type: ignore[union-attr]
    assert len(pool) == 1


def test_candidates_max_devices_evicts_the_oldest_recorded() -> None:
    pool = CandidatePool(max_devices=2)
    pool.record("a", 0, _params(0.0))
    pool.record("b", 0, _params(1.0))
    pool.record("a", 1, _params(2.0))  # a re-recorded: b is now the oldest
    pool.record("c", 1, _params(3.0))
    assert "b" not in pool and "a" in pool and "c" in pool and len(pool) == 2


def test_candidates_choose_serves_preferred_first_then_random_others_never_the_requester() -> None:
    pool = _pool("a", "b", "c", "d", "e")
    chosen = pool.choose("a", 3, prefer=["d", "a", "zz", "d"], rng=np.random.default_rng(0))
    ids = [c.device for c in chosen]
    assert ids[0] == "d" and len(ids) == 3 and len(set(ids)) == 3 and "a" not in ids
    np.testing.assert_array_equal(chosen[0].params["w"], np.full((2, 3), 3.0, dtype=np.float32))
    # Same seed, same answer; the fill is drawn from the sorted remaining ids.
    again = pool.choose("a", 3, prefer=["d"], rng=np.random.default_rng(0))
    assert [c.device for c in again] == ids
    others = sorted({"b", "c", "e"})
    fill = [others[int(i)] for i in np.random.default_rng(0).choice(3, size=2, replace=False)]
    assert ids[1:] == fill


def test_candidates_choose_returns_fewer_when_the_pool_is_small() -> None:
    assert CandidatePool().choose("a", 4, rng=np.random.default_rng(1)) == []
    assert _pool("a").choose("a", 4, rng=np.random.default_rng(1)) == []
    assert sorted(c.device for c in _pool("a", "b", "c").choose("a", 8, rng=np.random.default_rng(1))) == ["b", "c"]
    assert _pool("a", "b").choose("a", 0, prefer=["b"], rng=np.random.default_rng(1)) == []
    assert [c.device for c in _pool("a", "b", "c").choose("c", 1, prefer=["b", "a"], rng=np.random.default_rng(1))] == ["b"]


def test_candidates_rejects_bad_arguments() -> None:
    pool = CandidatePool()
    with pytest.raises(ValueError):
        pool.record("bad/id", 0, _params(0.0))
    with pytest.raises(ValueError):
        pool.record("a", -1, _params(0.0))
    with pytest.raises(ValueError):
        pool.choose("a", -1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError):
        CandidatePool(max_devices=0)
