"""Data-scarce variants of a federated dataset: at most N labelled examples per class on every client.

:func:`limit_per_class` keeps, on every client, the first ``train_per_class``
training examples of each class and the first ``val_per_class`` validation
examples of each class, in the order the loader produced them; the test split
is untouched, so accuracy is still measured on every test example the client
has. "First" is chosen on purpose: the smartwatch loader's arrays are in time
order, so a scarce smartwatch device holds the first repetitions of each
exercise (the device that has just started recording); every other loader
shuffles each client's examples with its seed, so there "first" is a seeded
random subset. A class with fewer examples than the cap keeps all of them.

The default validation cap is a fifth of the training cap (at least one):
a device with 10 labelled examples per class does not also hold 100
validation examples. The benchmark's scarce settings (10, 25 and 50 per class)
use it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from sdk.datasets.federated import ClientData, FederatedDataset, LabeledArrays


def default_val_per_class(train_per_class: int) -> int:
    """A fifth of the training cap, at least 1."""
    return max(1, train_per_class // 5)


def first_per_class(part: LabeledArrays, cap: int) -> LabeledArrays:
    """The first ``cap`` examples of each class of ``part``, in their original order."""
    if cap < 0:
        raise ValueError("cap must be >= 0")
    keep = np.zeros(len(part), dtype=bool)
    for label in np.unique(part.y):
        keep[np.flatnonzero(part.y == label)[:cap]] = True
    return LabeledArrays(x=np.ascontiguousarray(part.x[keep]), y=np.ascontiguousarray(part.y[keep]))


def limit_per_class(dataset: FederatedDataset, *, train_per_class: int, val_per_class: int | None = None) -> FederatedDataset:
    """``dataset`` with at most ``train_per_class`` training and ``val_per_class`` validation examples per class per client.

    ``val_per_class`` None: :func:`default_val_per_class`. Test splits are kept
    whole. The description gains one clause saying what was kept.
    """
    if train_per_class < 1:
        raise ValueError("train_per_class must be >= 1")
    val_cap = default_val_per_class(train_per_class) if val_per_class is None else val_per_class
    if val_cap < 0:
        raise ValueError("val_per_class must be >= 0")
    clients = tuple(
        ClientData(client_id=c.client_id, region=c.region, train=first_per_class(c.train, train_per_class),
                   val=first_per_class(c.val, val_cap), test=c.test)
        for c in dataset.clients
    )
    return replace(dataset, clients=clients,
                   description=(f"{dataset.description}; data-scarce: at most {train_per_class} training and {val_cap}"
                                " validation examples per class per client (the first in the loader's order), test whole"))
