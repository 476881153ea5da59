"""The container every fedge dataset loader returns: clients, each with train/val/test arrays.

Features are float32 and labels int64 (class indices in ``[0, num_classes)``)
whatever the source, so a simulator can hand any client's arrays straight to
the trainer. Arrays are made read-only when a :class:`LabeledArrays` is built:
one loaded dataset can be shared by many simulated clients without one of
them changing another's data by accident.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from sdk.datasets.partition import train_val_test_indices

SplitName = Literal["train", "val", "test"]


@dataclass(frozen=True, kw_only=True)
class LabeledArrays:
    """Examples ``x`` (float32, first axis = example) and labels ``y`` (int64, one per example).

    Zero rows is allowed and means "this client has no data in this split"
    (e.g. no validation split was asked for).
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or self.x.dtype != np.float32:
            raise TypeError(f"x must be a float32 ndarray, got {getattr(self.x, 'dtype', type(self.x))}")
        if not isinstance(self.y, np.ndarray) or self.y.dtype != np.int64 or self.y.ndim != 1:
            raise TypeError(f"y must be a 1-D int64 ndarray, got {getattr(self.y, 'dtype', type(self.y))}")
        if self.x.ndim < 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x and y need the same number of rows, got {self.x.shape} and {self.y.shape}")
        self.x.setflags(write=False)
        self.y.setflags(write=False)

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True, kw_only=True)
class ClientData:
    """One client's data: its id, optional region and its three splits.

    ``region`` groups clients for hierarchical (regional) aggregation; ``None``
    means the dataset defines no grouping.
    """

    client_id: str
    region: str | None
    train: LabeledArrays
    val: LabeledArrays
    test: LabeledArrays

    def split(self, name: SplitName) -> LabeledArrays:
        """The ``"train"``, ``"val"`` or ``"test"`` split."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        if name not in splits:
            raise ValueError(f"unknown split {name!r}; expected 'train', 'val' or 'test'")
        return splits[name]


@dataclass(frozen=True, kw_only=True)
class FederatedDataset:
    """A dataset split over clients, with what a model needs to know about it.

    ``input_shape`` is the shape of one example (no batch axis);
    ``description`` says in a sentence how the data was split (so benchmark
    reports can quote it); ``class_names`` is empty when the source has none.
    Construction checks that every client's arrays match ``input_shape`` and
    that every label is in ``[0, num_classes)``.
    """

    name: str
    clients: tuple[ClientData, ...]
    input_shape: tuple[int, ...]
    num_classes: int
    description: str
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "clients", tuple(self.clients))
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if not self.clients:
            raise ValueError("a federated dataset needs at least one client")
        if self.num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        ids = [c.client_id for c in self.clients]
        if len(set(ids)) != len(ids):
            raise ValueError("client ids must be unique")
        for client in self.clients:
            for name, part in (("train", client.train), ("val", client.val), ("test", client.test)):
                if part.x.shape[1:] != self.input_shape:
                    raise ValueError(
                        f"client {client.client_id} {name}: example shape {part.x.shape[1:]} != {self.input_shape}"
                    )
                if len(part) and (part.y.min() < 0 or part.y.max() >= self.num_classes):
                    raise ValueError(f"client {client.client_id} {name}: labels outside [0, {self.num_classes})")

    @property
    def regions(self) -> tuple[str, ...]:
        """The distinct regions in client order; empty when no client has one."""
        return tuple(dict.fromkeys(c.region for c in self.clients if c.region is not None))

    def with_regions(self, regions: Mapping[str, str]) -> FederatedDataset:
        """The same clients and arrays, with ``regions[client_id]`` as each client's region."""
        missing = [c.client_id for c in self.clients if c.client_id not in regions]
        if missing:
            raise ValueError(f"no region given for clients {missing}")
        return replace(self, clients=tuple(replace(c, region=str(regions[c.client_id])) for c in self.clients))

    def num_samples(self, split: SplitName = "train") -> int:
        """Total number of examples in ``split`` over all clients."""
        return sum(len(c.split(split)) for c in self.clients)

    def class_counts(self, split: SplitName = "train") -> np.ndarray:
        """A (num_clients, num_classes) int64 table: examples of each class per client."""
        return np.stack([np.bincount(c.split(split).y, minlength=self.num_classes) for c in self.clients])


def split_client(
    *,
    client_id: str,
    region: str | None,
    x: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    test_fraction: float,
    val_fraction: float,
) -> ClientData:
    """Shuffle one client's pooled examples and cut them into train/val/test.

    See :func:`~sdk.datasets.partition.train_val_test_indices` for how the
    counts are rounded; ``x`` is cast to float32 and ``y`` to int64.
    """
    parts = train_val_test_indices(len(y), test_fraction=test_fraction, val_fraction=val_fraction, rng=rng)
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)

    def take(idx: np.ndarray) -> LabeledArrays:
        return LabeledArrays(x=np.ascontiguousarray(x[idx]), y=np.ascontiguousarray(y[idx]))

    return ClientData(client_id=client_id, region=region, train=take(parts.train), val=take(parts.val),
                      test=take(parts.test))


def region_names(num_clients: int, num_regions: int | None) -> tuple[str | None, ...]:
    """Regions for clients without a natural grouping: ``region-<k>`` round-robin, or all ``None``.

    Client ``i`` goes to region ``i % num_regions``, so regions differ in size
    by at most one client. ``num_regions=None`` gives every client ``None``.
    """
    if num_regions is None:
        return (None,) * num_clients
    if not 1 <= num_regions <= num_clients:
        raise ValueError(f"num_regions must be in [1, {num_clients}], got {num_regions}")
    width = len(str(num_regions - 1))
    return tuple(f"region-{i % num_regions:0{width}d}" for i in range(num_clients))


def client_ids(prefix: str, count: int) -> tuple[str, ...]:
    """``prefix-00``, ``prefix-01``...: zero-padded so ids sort in client order."""
    width = max(2, len(str(count - 1)))
    return tuple(f"{prefix}-{i:0{width}d}" for i in range(count))



def regions_by_label_mix(dataset: FederatedDataset, num_regions: int, *, seed: int = 0, max_iterations: int = 100) -> dict[str, str]:
    """Group clients whose training label distributions look alike into ``num_regions`` regions.

    k-means (k-means++ seeding, at most ``max_iterations`` Lloyd steps) on
    each client's normalised training label histogram; a cluster left empty
    takes the client farthest from its centre, so every region has at least
    one client. Regions are named ``labels-<k>``, numbered by their first
    client. Deterministic for a given ``seed``.
    """
    n = len(dataset.clients)
    if not 1 <= num_regions <= n:
        raise ValueError(f"num_regions must be in [1, {n}], got {num_regions}")
    counts = dataset.class_counts("train").astype(np.float64)
    points = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    rng = np.random.default_rng(seed)
    centres = [points[rng.integers(n)]]
    while len(centres) < num_regions:
        d2 = np.min([np.sum((points - c) ** 2, axis=1) for c in centres], axis=0)
        total = d2.sum()
        centres.append(points[rng.choice(n, p=d2 / total)] if total > 0 else points[rng.integers(n)])
    centre = np.stack(centres)
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(max_iterations):
        dist = ((points[:, None, :] - centre[None, :, :]) ** 2).sum(axis=2)
        new = dist.argmin(axis=1)
        for k in range(num_regions):
            if not np.any(new == k):
                sizes = np.bincount(new, minlength=num_regions)
                movable = np.flatnonzero(sizes[new] > 1)  # never empty another cluster
                far = int(movable[np.argmax(dist[movable, new[movable]])])
                new[far] = k
        centre = np.stack([points[new == k].mean(axis=0) for k in range(num_regions)])
        if np.array_equal(new, assign):
            break
        assign = new
    first: dict[int, int] = {}
    for k in assign.tolist():
        first.setdefault(int(k), len(first))
    width = len(str(num_regions - 1))
    return {c.client_id: f"labels-{first[int(assign[i])]:0{width}d}" for i, c in enumerate(dataset.clients)}
