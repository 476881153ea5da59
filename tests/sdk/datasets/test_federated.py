"""Tests for sdk.datasets.federated: the dataset container checks what loaders promise."""

from __future__ import annotations

import numpy as np
import pytest

from sdk.datasets.federated import ClientData, FederatedDataset, LabeledArrays, region_names


def _arrays(n: int, *, label: int = 0) -> LabeledArrays:
    return LabeledArrays(x=np.zeros((n, 3), np.float32), y=np.full(n, label, np.int64))


def _client(client_id: str, *, label: int = 0) -> ClientData:
    return ClientData(client_id=client_id, region=None, train=_arrays(4, label=label), val=_arrays(0),
                      test=_arrays(2, label=label))


def test_labeled_arrays_rejects_wrong_dtypes_and_lengths() -> None:
    with pytest.raises(TypeError, match="float32"):
        LabeledArrays(x=np.zeros((2, 3)), y=np.zeros(2, np.int64))
    with pytest.raises(TypeError, match="int64"):
        LabeledArrays(x=np.zeros((2, 3), np.float32), y=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="same number of rows"):
        LabeledArrays(x=np.zeros((2, 3), np.float32), y=np.zeros(3, np.int64))


def test_labeled_arrays_are_read_only() -> None:
    arrays = _arrays(2)
    with pytest.raises(ValueError, match="read-only"):
        arrays.x[0, 0] = 1.0


def test_federated_dataset_rejects_out_of_range_labels_shapes_and_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="labels outside"):
        FederatedDataset(name="d", clients=(_client("a", label=5),), input_shape=(3,), num_classes=5, description="")
    with pytest.raises(ValueError, match="example shape"):
        FederatedDataset(name="d", clients=(_client("a"),), input_shape=(4,), num_classes=5, description="")
    with pytest.raises(ValueError, match="unique"):
        FederatedDataset(name="d", clients=(_client("a"), _client("a")), input_shape=(3,), num_classes=5,
                         description="")


def test_federated_dataset_class_counts_per_client() -> None:
    data = FederatedDataset(name="d", clients=(_client("a", label=1), _client("b", label=2)), input_shape=(3,),
                            num_classes=3, description="")
    np.testing.assert_array_equal(data.class_counts("train"), [[0, 4, 0], [0, 0, 4]])
    assert data.num_samples("test") == 4 and data.num_samples("val") == 0
    assert data.regions == ()


def test_region_names_round_robin_and_none() -> None:
    assert region_names(5, 2) == ("region-0", "region-1", "region-0", "region-1", "region-0")
    assert region_names(3, None) == (None, None, None)
    with pytest.raises(ValueError):
        region_names(3, 4)
