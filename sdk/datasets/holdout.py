"""A validation split for clients whose data came without one.

FedFomo weighs peers on each device's validation split, and any tuning a
user does needs held-out data that is not the test split. When a client has
no validation examples, :func:`ensure_validation_split` moves a seeded random
``fraction`` of its training examples (rounded down, at least one) into
validation. It does so for every algorithm, so all methods compared on a
dataset train on the same examples. A client with fewer than two training
examples keeps them all and gets no validation split. Clients that already
have a validation split are left as they are.

Time-ordered data (sensor windows) leaks across a random cut: such data
should come with its own ``x_val``/``y_val`` cut in time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from sdk.datasets.federated import ClientData, FederatedDataset, LabeledArrays
from sdk.datasets.partition import check_fraction

DEFAULT_VALIDATION_FRACTION = 0.1
"""Share of a client's training examples held out when it has no validation split."""

_SEED_TAG = 0x76616C  # keeps this RNG stream apart from the simulator's other seeded streams


@dataclass(frozen=True, kw_only=True)
class ValidationSplit:
    """The dataset with validation splits made, and what was moved.

    ``held_out`` maps each client that got a new validation split to the
    number of examples moved out of its training split; empty when every
    client already had one (or ``fraction`` was 0).
    """

    dataset: FederatedDataset
    held_out: dict[str, int]
    fraction: float
    seed: int

    def describe(self) -> str:
        """One sentence for reports; empty when nothing was held out."""
        if not self.held_out:
            return ""
        n = len(self.held_out)
        total = len(self.dataset.clients)
        who = "no client came with a validation split" if n == total else f"{n} of {total} clients came without a validation split"
        return (f"{who}: held out {self.fraction:.0%} of each one's training examples"
                f" (at least 1; {sum(self.held_out.values())} in all), seed {self.seed}")


def held_out_count(n_train: int, fraction: float) -> int:
    """How many of ``n_train`` examples go to validation: floor(fraction * n), at least 1, none if n < 2 or fraction is 0."""
    if fraction == 0 or n_train < 2:
        return 0
    return max(1, math.floor(fraction * n_train + 1e-9))


def ensure_validation_split(dataset: FederatedDataset, *, fraction: float = DEFAULT_VALIDATION_FRACTION,
                            seed: int = 0) -> ValidationSplit:
    """Give every client without validation examples a seeded random share of its training examples.

    The same dataset, fraction and seed always move the same examples.
    ``fraction`` 0 changes nothing.
    """
    check_fraction("validation fraction", fraction)
    clients: list[ClientData] = []
    held_out: dict[str, int] = {}
    for index, client in enumerate(dataset.clients):
        n_val = held_out_count(len(client.train), fraction) if len(client.val) == 0 else 0
        if n_val == 0:
            clients.append(client)
            continue
        order = np.random.default_rng([seed, _SEED_TAG, index]).permutation(len(client.train))
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        x, y = client.train.x, client.train.y
        clients.append(replace(
            client,
            train=LabeledArrays(x=np.ascontiguousarray(x[train_idx]), y=np.ascontiguousarray(y[train_idx])),
            val=LabeledArrays(x=np.ascontiguousarray(x[val_idx]), y=np.ascontiguousarray(y[val_idx])),
        ))
        held_out[client.client_id] = n_val
    out = ValidationSplit(dataset=dataset, held_out=held_out, fraction=fraction, seed=seed)
    if held_out:
        out = replace(out, dataset=replace(dataset, clients=tuple(clients),
                                           description=f"{dataset.description}; {out.describe()}"))
    return out
