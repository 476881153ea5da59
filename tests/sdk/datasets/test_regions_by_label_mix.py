"""Grouping clients into regions by their label mix (for the hierarchical benchmark)."""

from __future__ import annotations

import numpy as np
import pytest

from sdk.datasets import ClientData, FederatedDataset, LabeledArrays, regions_by_label_mix


def _dataset(label_sets: list[list[int]]) -> FederatedDataset:
    def arrays(labels: list[int]) -> LabeledArrays:
        y = np.array(labels * 5, dtype=np.int64)
        return LabeledArrays(x=np.zeros((len(y), 2), dtype=np.float32), y=y)

    clients = tuple(ClientData(client_id=f"c{i}", region=None, train=arrays(ls), val=arrays(ls), test=arrays(ls))
                    for i, ls in enumerate(label_sets))
    return FederatedDataset(name="t", clients=clients, input_shape=(2,), num_classes=6, description="test")


def test_clients_with_the_same_labels_share_a_region() -> None:
    data = _dataset([[0, 1], [4, 5], [0, 1, 1], [4, 5, 5], [0, 0, 1], [5, 4]])
    regions = regions_by_label_mix(data, 2, seed=0)
    assert regions["c0"] == regions["c2"] == regions["c4"] == "labels-0"
    assert regions["c1"] == regions["c3"] == regions["c5"] == "labels-1"
    assert regions_by_label_mix(data, 2, seed=0) == regions
    tagged = data.with_regions(regions)
    assert tagged.regions == ("labels-0", "labels-1")


def test_every_region_gets_a_client_even_with_identical_clients() -> None:
    data = _dataset([[0, 1]] * 4)
    regions = regions_by_label_mix(data, 3, seed=1)
    assert len(set(regions.values())) == 3


def test_bad_region_counts_and_missing_assignments_are_refused() -> None:
    data = _dataset([[0], [1]])
    with pytest.raises(ValueError, match="num_regions"):
        regions_by_label_mix(data, 3)
    with pytest.raises(ValueError, match="no region"):
        data.with_regions({"c0": "a"})
