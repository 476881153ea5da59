"""Tests for sdk.datasets.synthetic: FedProx's Synthetic(alpha, beta) generator."""

from __future__ import annotations

import numpy as np
import pytest

from sdk.datasets.federated import FederatedDataset
from sdk.datasets.synthetic import feature_variances, make_synthetic, synthetic_device_sizes


def _pooled(client) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([client.train.x, client.val.x, client.test.x]),
            np.concatenate([client.train.y, client.val.y, client.test.y]))


def _mean_label_distance(data: FederatedDataset) -> float:
    """Mean total-variation distance between two devices' label distributions."""
    counts = sum(data.class_counts(s) for s in ("train", "val", "test"))
    p = counts / counts.sum(axis=1, keepdims=True)
    n = len(p)
    return float(np.mean([0.5 * np.abs(p[i] - p[j]).sum() for i in range(n) for j in range(i + 1, n)]))


@pytest.fixture(scope="module")
def synthetic_1_1() -> FederatedDataset:
    return make_synthetic(alpha=1.0, beta=1.0, seed=0)


def test_make_synthetic_shapes_and_label_range(synthetic_1_1: FederatedDataset) -> None:
    assert len(synthetic_1_1.clients) == 30 and synthetic_1_1.input_shape == (60,)
    for client in synthetic_1_1.clients:
        x, y = _pooled(client)
        assert x.dtype == np.float32 and x.shape[1] == 60
        assert y.min() >= 0 and y.max() < 10


def test_make_synthetic_device_sizes_come_from_the_seeded_lognormal(synthetic_1_1: FederatedDataset) -> None:
    expected = synthetic_device_sizes(30, rng=np.random.default_rng(0))
    assert [len(_pooled(c)[1]) for c in synthetic_1_1.clients] == expected.tolist()


def test_synthetic_device_sizes_are_lognormal_4_2_plus_50() -> None:
    sizes = synthetic_device_sizes(4000, rng=np.random.default_rng(0))
    assert sizes.min() >= 50
    logs = np.log(sizes - 50 + 0.5)  # +0.5 undoes the floor on average and keeps log finite
    assert abs(np.median(logs) - 4.0) < 0.15
    assert abs((np.quantile(logs, 0.75) - np.quantile(logs, 0.25)) / 1.349 - 2.0) < 0.15


def test_make_synthetic_within_device_feature_variance_is_j_pow_minus_1_2(synthetic_1_1: FederatedDataset) -> None:
    centred = [x - x.mean(axis=0) for x, _ in map(_pooled, synthetic_1_1.clients)]
    ratio = np.concatenate(centred).var(axis=0) / feature_variances(60)
    assert np.all(np.abs(ratio - 1.0) < 0.15)


def test_make_synthetic_non_iid_labels_differ_far_more_than_iid(synthetic_1_1: FederatedDataset) -> None:
    iid = make_synthetic(iid=True, seed=0)
    assert _mean_label_distance(synthetic_1_1) > 0.6
    assert _mean_label_distance(iid) < 0.3
    pooled_iid = np.concatenate([_pooled(c)[0] for c in iid.clients])
    assert np.all(np.abs(pooled_iid.mean(axis=0)) < 0.1)  # v_k = 0 for every device


def test_make_synthetic_splits_each_device_75_25_with_val_from_train(synthetic_1_1: FederatedDataset) -> None:
    for client in synthetic_1_1.clients:
        n = len(_pooled(client)[1])
        rest = int(0.75 * n)
        assert len(client.test) == n - rest and len(client.val) == int(0.1 * rest)


def test_make_synthetic_same_seed_identical_arrays(synthetic_1_1: FederatedDataset) -> None:
    again = make_synthetic(alpha=1.0, beta=1.0, seed=0)
    for a, b in zip(synthetic_1_1.clients, again.clients):
        np.testing.assert_array_equal(a.train.x, b.train.x)
        np.testing.assert_array_equal(a.test.y, b.test.y)
    other = make_synthetic(alpha=1.0, beta=1.0, seed=1)
    assert not np.array_equal(other.clients[0].train.x[:5], synthetic_1_1.clients[0].train.x[:5])
