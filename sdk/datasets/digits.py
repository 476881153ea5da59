"""scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes) as a small federated fixture.

The data ships inside scikit-learn (UCI "Optical Recognition of Handwritten
Digits", Alpaydin & Kaynak 1998) and loads in milliseconds, which makes it
the dataset for unit tests. Pixels are scaled from 0..16 to [0, 1] and kept
flat: examples are float32 vectors of 64.
"""

from __future__ import annotations

import numpy as np

from sdk.datasets.federated import FederatedDataset, client_ids, region_names, split_client
from sdk.datasets.partition import dirichlet_split, iid_split


def load_digits(
    *,
    num_clients: int = 10,
    label_skew: float | None = None,
    seed: int = 0,
    min_size: int = 20,
    test_fraction: float = 0.25,
    val_fraction: float = 0.1,
    num_regions: int | None = None,
) -> FederatedDataset:
    """The digits split over ``num_clients``: IID, or with Dirichlet label skew.

    ``label_skew=None`` deals a seeded shuffle evenly (IID); a number is the
    Dirichlet ``alpha`` of :func:`~sdk.datasets.partition.dirichlet_split`
    (0.1: a few classes per client; 100: nearly IID), with every client
    getting at least ``min_size`` images. ``num_regions`` groups clients
    round-robin into ``region-<k>``; ``None`` gives no regions.
    """
    from sklearn import datasets as sk_datasets  # type: ignore[import-untyped]  # here: a ~1 s import

    images, labels = sk_datasets.load_digits(return_X_y=True)
    x = (images / 16.0).astype(np.float32)
    y = labels.astype(np.int64)
    rng = np.random.default_rng(seed)
    if label_skew is None:
        parts = iid_split(len(y), num_clients=num_clients, rng=rng)
        how = "IID (seeded shuffle dealt evenly)"
    else:
        parts = dirichlet_split(y, num_clients=num_clients, alpha=label_skew, rng=rng, min_size=min_size)
        how = f"Dirichlet(alpha={label_skew}) label skew, min {min_size} per client"
    ids = client_ids("digits", num_clients)
    regions = region_names(num_clients, num_regions)
    clients = tuple(
        split_client(client_id=ids[j], region=regions[j], x=x[idx], y=y[idx], rng=rng,
                     test_fraction=test_fraction, val_fraction=val_fraction)
        for j, idx in enumerate(parts)
    )
    return FederatedDataset(
        name="digits",
        clients=clients,
        input_shape=(64,),
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
        description=(f"scikit-learn digits (1,797 8x8 images) over {num_clients} clients, {how}; per-client shuffled "
                     f"{1 - test_fraction:.0%}/{test_fraction:.0%} train/test cut, {val_fraction:.0%} of train "
                     f"held out for val, seed {seed}"),
    )
