"""Tests for sdk.datasets.partition: Dirichlet label skew, IID dealing and train/val/test cuts."""

from __future__ import annotations

import numpy as np
import pytest

from sdk.datasets.errors import DatasetError
from sdk.datasets.partition import dirichlet_split, iid_split, train_val_test_indices

# 10 balanced classes of 700: the shape of pooled Fashion-MNIST at 1/10 scale.
LABELS = np.repeat(np.arange(10), 700)


def _classes_per_client(parts: tuple[np.ndarray, ...]) -> np.ndarray:
    return np.array([len(np.unique(LABELS[p])) for p in parts])


def test_dirichlet_split_covers_every_sample_exactly_once() -> None:
    parts = dirichlet_split(LABELS, num_clients=20, alpha=0.1, rng=np.random.default_rng(0))
    assert len(parts) == 20
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def test_dirichlet_split_alpha_0_1_is_skewed_and_alpha_100_is_not() -> None:
    skewed = _classes_per_client(dirichlet_split(LABELS, num_clients=20, alpha=0.1, rng=np.random.default_rng(0)))
    near_iid = _classes_per_client(dirichlet_split(LABELS, num_clients=20, alpha=100.0, rng=np.random.default_rng(0)))
    assert skewed.mean() < 6.0
    assert near_iid.min() == 10


def test_dirichlet_split_respects_min_size() -> None:
    parts = dirichlet_split(LABELS, num_clients=20, alpha=0.1, rng=np.random.default_rng(3), min_size=100)
    assert min(len(p) for p in parts) >= 100


def test_dirichlet_split_same_seed_same_partition() -> None:
    a = dirichlet_split(LABELS, num_clients=20, alpha=0.1, rng=np.random.default_rng(7))
    b = dirichlet_split(LABELS, num_clients=20, alpha=0.1, rng=np.random.default_rng(7))
    c = dirichlet_split(LABELS, num_clients=20, alpha=0.1, rng=np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_split_unreachable_min_size_raises_after_max_tries() -> None:
    # 5 classes, near-zero alpha: each class lands on one client, so 5 of 10 clients stay empty.
    labels = np.repeat(np.arange(5), 20)
    with pytest.raises(DatasetError, match="min_size|>= 10"):
        dirichlet_split(labels, num_clients=10, alpha=1e-3, rng=np.random.default_rng(0), min_size=10, max_tries=3)
    with pytest.raises(ValueError, match="impossible"):
        dirichlet_split(labels, num_clients=10, alpha=1.0, rng=np.random.default_rng(0), min_size=11)


def test_train_val_test_indices_rounds_like_train_test_split() -> None:
    parts = train_val_test_indices(100, test_fraction=0.25, val_fraction=0.1, rng=np.random.default_rng(0))
    assert (len(parts.train), len(parts.val), len(parts.test)) == (68, 7, 25)
    np.testing.assert_array_equal(np.sort(np.concatenate([parts.train, parts.val, parts.test])), np.arange(100))
    small = train_val_test_indices(10, test_fraction=0.25, val_fraction=0.0, rng=np.random.default_rng(0))
    assert (len(small.train), len(small.val), len(small.test)) == (7, 0, 3)


def test_train_val_test_indices_rejects_fraction_of_one() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        train_val_test_indices(10, test_fraction=1.0, val_fraction=0.0, rng=np.random.default_rng(0))


def test_iid_split_sizes_differ_by_at_most_one() -> None:
    parts = iid_split(1797, num_clients=10, rng=np.random.default_rng(0))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1797
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1797))
