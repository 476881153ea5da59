"""Real non-IID federated datasets for fedge's simulator and benchmarks, all offline.

Every loader returns a :class:`FederatedDataset`: clients with float32/int64
train/val/test arrays, plus the input shape, class count and a one-line
description of how the data was split. The same arguments (seed included)
give identical arrays.

- :func:`load_watch`: seglearn's smartwatch IMU data, 20 natural clients
  (10 subjects x left/right arm), 7 exercises, (6, 100) windows.
- :func:`load_fashion_mnist`: Debian's Fashion-MNIST, Dirichlet label skew (PFLlib's setting).
- :func:`make_synthetic`: FedProx's Synthetic(alpha, beta) generator.
- :func:`load_digits`: scikit-learn's digits, the fast unit-test fixture.
- :func:`load_client_folder` / :func:`clients_from_arrays`: your own per-client
  data (a folder of ``.npz`` files, or the same arrays in memory), validated.
- :func:`limit_per_class`: a data-scarce variant of any of them (at most N
  training examples per class per client).

:func:`ensure_validation_split` holds out part of each client's training data
as validation where the data has none (the simulator does this for you).
"""

from __future__ import annotations

from sdk.datasets.digits import load_digits
from sdk.datasets.errors import DatasetError, DatasetFormatError, DatasetNotFoundError, UnsafePickleError
from sdk.datasets.fashion_mnist import load_fashion_mnist, read_fashion_mnist, read_idx
from sdk.datasets.holdout import DEFAULT_VALIDATION_FRACTION, ValidationSplit, ensure_validation_split
from sdk.datasets.federated import ClientData, FederatedDataset, LabeledArrays, regions_by_label_mix, split_client
from sdk.datasets.partition import SplitIndices, dirichlet_split, iid_split, train_val_test_indices
from sdk.datasets.restricted_pickle import RestrictedUnpickler, read_object_npy, restricted_loads
from sdk.datasets.scarce import limit_per_class
from sdk.datasets.user_folder import clients_from_arrays, load_client_folder
from sdk.datasets.synthetic import make_synthetic, synthetic_device_sizes
from sdk.datasets.watch import RecordingSplit, TimeSplit, load_watch, read_watch_recordings

__all__ = [
    "DEFAULT_VALIDATION_FRACTION",
    "ValidationSplit",
    "clients_from_arrays",
    "ensure_validation_split",
    "load_client_folder",
    "ClientData",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "FederatedDataset",
    "LabeledArrays",
    "RecordingSplit",
    "RestrictedUnpickler",
    "SplitIndices",
    "TimeSplit",
    "UnsafePickleError",
    "dirichlet_split",
    "iid_split",
    "load_digits",
    "load_fashion_mnist",
    "load_watch",
    "limit_per_class",
    "make_synthetic",
    "regions_by_label_mix",
    "read_fashion_mnist",
    "read_idx",
    "read_object_npy",
    "read_watch_recordings",
    "restricted_loads",
    "split_client",
    "synthetic_device_sizes",
    "train_val_test_indices",
]
