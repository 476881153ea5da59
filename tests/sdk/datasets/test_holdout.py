"""Validation splits made where the data has none: seeded, 10% rounded down, at least one, none below two examples."""

from __future__ import annotations

import numpy as np
import pytest

from sdk.datasets import clients_from_arrays, ensure_validation_split
from sdk.datasets.holdout import held_out_count


def _client(n_train: int, *, val: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"x_train": np.arange(n_train, dtype=np.float32)[:, None] + 1000 * seed, "y_train": rng.integers(0, 2, n_train),
           "x_test": np.zeros((2, 1)), "y_test": np.array([0, 1])}
    if val:
        out |= {"x_val": np.zeros((val, 1)), "y_val": np.zeros(val, int)}
    return out


@pytest.mark.parametrize("n,fraction,expected", [(100, 0.1, 10), (59, 0.1, 5), (5, 0.1, 1), (2, 0.1, 1), (1, 0.1, 0),
                                                 (0, 0.1, 0), (100, 0.0, 0), (10, 0.3, 3)])
def test_held_out_count_rounds_down_keeps_at_least_one_and_none_below_two(n: int, fraction: float, expected: int) -> None:
    assert held_out_count(n, fraction) == expected


def test_validation_split_moves_a_seeded_share_of_train_only_where_missing() -> None:
    data = clients_from_arrays({"a": _client(50), "b": _client(30, val=4, seed=1), "c": _client(1, seed=2)})
    made = ensure_validation_split(data, fraction=0.1, seed=7)
    assert made.held_out == {"a": 5}
    a_before, a_after = data.clients[0], made.dataset.clients[0]
    assert (len(a_after.train), len(a_after.val)) == (45, 5)
    # Nothing lost, nothing duplicated: train + val is the old train.
    merged = np.sort(np.concatenate([a_after.train.x[:, 0], a_after.val.x[:, 0]]))
    np.testing.assert_array_equal(merged, np.sort(a_before.train.x[:, 0]))
    assert made.dataset.clients[1] is data.clients[1] and made.dataset.clients[2] is data.clients[2]
    assert "1 of 3 clients came without a validation split" in made.describe()
    assert made.describe() in made.dataset.description
    # Same seed, same examples; another seed, other examples.
    again = ensure_validation_split(data, fraction=0.1, seed=7).dataset.clients[0].val.x
    other = ensure_validation_split(data, fraction=0.1, seed=8).dataset.clients[0].val.x
    np.testing.assert_array_equal(again, a_after.val.x)
    assert not np.array_equal(other, a_after.val.x)


def test_validation_split_changes_nothing_when_every_client_has_one_or_fraction_is_zero() -> None:
    data = clients_from_arrays({"a": _client(20, val=2), "b": _client(20, val=3, seed=1)})
    assert ensure_validation_split(data).dataset is data
    bare = clients_from_arrays({"a": _client(20)})
    made = ensure_validation_split(bare, fraction=0.0)
    assert made.dataset is bare and made.held_out == {} and made.describe() == ""
    with pytest.raises(ValueError, match="validation fraction"):
        ensure_validation_split(bare, fraction=1.0)
