"""Tests for sdk.datasets.digits: the fast scikit-learn digits fixture, IID or label-skewed."""

from __future__ import annotations

import numpy as np

from sdk.datasets.digits import load_digits


def _all_counts(data) -> np.ndarray:
    return sum(data.class_counts(s) for s in ("train", "val", "test"))


def test_load_digits_iid_shapes_and_every_client_sees_every_class() -> None:
    data = load_digits(num_clients=10)
    counts = _all_counts(data)
    assert data.input_shape == (64,) and len(data.clients) == 10
    assert counts.sum() == 1797 and (counts > 0).all()
    x = data.clients[0].train.x
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0


def test_load_digits_label_skew_concentrates_classes() -> None:
    counts = _all_counts(load_digits(num_clients=10, label_skew=0.1))
    assert counts.sum() == 1797
    assert (counts > 0).sum(axis=1).mean() < 7.0


def test_load_digits_same_seed_identical_arrays_and_regions() -> None:
    a = load_digits(num_clients=6, label_skew=0.5, seed=4, num_regions=2)
    b = load_digits(num_clients=6, label_skew=0.5, seed=4, num_regions=2)
    for ca, cb in zip(a.clients, b.clients):
        np.testing.assert_array_equal(ca.train.x, cb.train.x)
        np.testing.assert_array_equal(ca.val.y, cb.val.y)
    assert a.regions == ("region-0", "region-1")
