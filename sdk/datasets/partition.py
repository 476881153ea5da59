"""Pure index arithmetic for federated splits: who gets which sample, and train/val/test cuts.

Everything here maps sizes or labels plus a seeded ``numpy.random.Generator``
to integer index arrays; no data is copied and no file is read, so the same
functions split Fashion-MNIST, the digits fixture or anything else.

:func:`dirichlet_split` follows the label-skew convention of PFLlib
(Zhang et al., "PFLlib: Personalized Federated Learning Algorithm Library",
github.com/TsingZ0/PFLlib, ``dataset/utils/dataset_utils.py``,
``separate_data(..., partition="dir")``), itself after Yurochkin et al.,
"Bayesian Nonparametric Federated Learning of Neural Networks" (ICML 2019):

1. For each class ``k``: shuffle that class's sample indices and draw client
   proportions ``p ~ Dirichlet(alpha * 1_N)`` over the ``N`` clients.
2. Clients that already hold at least ``len(labels) / N`` samples get
   proportion 0 for this class (a soft cap that keeps sizes from exploding),
   and ``p`` is renormalised.
3. The class is cut at ``floor(cumsum(p) * n_k)``: client ``j`` gets the
   ``j``-th piece.
4. If the smallest client ends up with fewer than ``min_size`` samples, the
   whole draw is repeated. PFLlib's ``least_samples`` was
   ``batch_size / (1 - train_size) = 10 / 0.25 = 40`` for years (enough for
   one test batch after the 75/25 cut) and is 1 in its current version;
   fedge defaults to 40.

PFLlib then cuts each client's pooled samples 75/25 into train/test with
scikit-learn's ``train_test_split`` (``train_size=0.75``, shuffled, not
stratified): :func:`train_val_test_indices` does the same cut (train count
``floor(0.75 n)``) and can also carve a validation set out of the train part.
fedge draws from its own ``Generator``, so a seed does not reproduce PFLlib's
exact split (which used ``np.random.seed(1)``), only its distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdk.datasets.errors import DatasetError

# Guards floor() against 0.7 * 10 = 7.000000000000001-style float noise going the other way.
_FLOOR_EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class SplitIndices:
    """Positions (int64, into one client's pooled examples) of its train, val and test examples."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def check_fraction(name: str, value: float) -> None:
    """Raise ValueError unless ``0 <= value < 1``."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def train_val_test_indices(
    n: int, *, test_fraction: float, val_fraction: float, rng: np.random.Generator
) -> SplitIndices:
    """Shuffle ``range(n)`` and cut it into train, val and test.

    The test set gets ``n - floor((1 - test_fraction) * n)`` examples (the
    scikit-learn ``train_test_split(train_size=...)`` rounding PFLlib uses);
    the validation set gets ``floor(val_fraction * rest)`` of the rest, and
    train keeps what remains. ``val_fraction=0`` gives an empty val split.
    """
    check_fraction("test_fraction", test_fraction)
    check_fraction("val_fraction", val_fraction)
    if n < 0:
        raise ValueError("n must be >= 0")
    order = rng.permutation(n).astype(np.int64)
    n_rest = math.floor((1.0 - test_fraction) * n + _FLOOR_EPS)
    n_val = math.floor(val_fraction * n_rest + _FLOOR_EPS)
    return SplitIndices(train=order[n_val:n_rest], val=order[:n_val], test=order[n_rest:])


def iid_split(n: int, *, num_clients: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Shuffle ``range(n)`` and deal it into ``num_clients`` parts whose sizes differ by at most one."""
    if num_clients < 1 or num_clients > n:
        raise ValueError(f"num_clients must be in [1, {n}], got {num_clients}")
    return tuple(np.sort(part) for part in np.array_split(rng.permutation(n).astype(np.int64), num_clients))


def dirichlet_split(
    labels: np.ndarray,
    *,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 40,
    max_tries: int = 1000,
) -> tuple[np.ndarray, ...]:
    """Partition sample indices over clients with Dirichlet(``alpha``) label skew (PFLlib's convention).

    Returns one sorted int64 index array per client; together they hold every
    index of ``labels`` exactly once. Small ``alpha`` (0.1) gives each client
    a few dominant classes; large ``alpha`` (100) approaches an IID split.
    Raises :class:`~sdk.datasets.errors.DatasetError` when no draw in
    ``max_tries`` gives every client at least ``min_size`` samples (lower
    ``min_size``, raise ``alpha`` or use fewer clients).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError("labels must be one-dimensional")
    n = labels.shape[0]
    if num_clients < 1:
        raise ValueError("num_clients must be >= 1")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if min_size < 0 or min_size * num_clients > n:
        raise ValueError(f"min_size={min_size} is impossible for {n} samples over {num_clients} clients")
    if max_tries < 1:
        raise ValueError("max_tries must be >= 1")
    by_class = [np.flatnonzero(labels == k).astype(np.int64) for k in np.unique(labels)]
    capacity = n / num_clients
    concentration = np.full(num_clients, float(alpha))
    for _ in range(max_tries):
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for members in by_class:
            members = rng.permutation(members)
            share = rng.dirichlet(concentration) * (sizes < capacity)
            if share.sum() <= 0.0:
                # Every open client drew an underflowing share (tiny alpha): split evenly among them.
                share = (sizes < capacity).astype(np.float64)
            share /= share.sum()
            cuts = (np.cumsum(share) * len(members)).astype(np.int64)[:-1]
            for j, piece in enumerate(np.split(members, cuts)):
                pieces[j].append(piece)
                sizes[j] += len(piece)
        if sizes.min() >= min_size:
            return tuple(np.sort(np.concatenate(p)) for p in pieces)
    raise DatasetError(
        f"no Dirichlet(alpha={alpha}) split of {n} samples over {num_clients} clients gave every client "
        f">= {min_size} samples in {max_tries} tries; lower min_size, raise alpha or use fewer clients"
    )
