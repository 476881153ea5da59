"""Data-scarce variants: at most N per class per client, first in the loader's order, test untouched."""

from __future__ import annotations

import numpy as np
import pytest

from sdk.datasets import limit_per_class, load_digits
from sdk.datasets.federated import LabeledArrays
from sdk.datasets.scarce import first_per_class


def test_first_per_class_keeps_the_first_of_each_class_in_order() -> None:
    part = LabeledArrays(x=np.arange(8, dtype=np.float32)[:, None], y=np.array([2, 0, 2, 2, 1, 0, 2, 0], dtype=np.int64))
    kept = first_per_class(part, 2)
    assert kept.y.tolist() == [2, 0, 2, 1, 0]
    assert kept.x[:, 0].tolist() == [0, 1, 2, 4, 5]


def test_limit_per_class_caps_train_and_val_and_keeps_test() -> None:
    data = load_digits(num_clients=4, label_skew=0.3, seed=0)
    scarce = limit_per_class(data, train_per_class=5)
    assert "at most 5 training and 1 validation" in scarce.description
    for before, after in zip(data.clients, scarce.clients):
        assert after.client_id == before.client_id
        assert np.all(np.bincount(after.train.y) <= 5) and np.all(np.bincount(after.val.y) <= 1)
        # a class with fewer examples than the cap keeps them all; no class disappears
        want = np.minimum(np.bincount(before.train.y, minlength=10), 5)
        assert np.bincount(after.train.y, minlength=10).tolist() == want.tolist()
        assert after.test is before.test
    with pytest.raises(ValueError):
        limit_per_class(data, train_per_class=0)
