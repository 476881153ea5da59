"""Fashion-MNIST (Xiao et al., 2017, arXiv:1708.07747) split over clients with Dirichlet label skew.

The files come from Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz``); nothing is
downloaded. :func:`load_fashion_mnist` follows PFLlib's
``dataset/generate_FashionMNIST.py`` (the setting of its leaderboard, which
fedge compares against):

- the 60k training and 10k test images are pooled (70k);
- :func:`~sdk.datasets.partition.dirichlet_split` gives them to 20 clients
  with Dirichlet(0.1) label skew (PFLlib's ``separate_data``, ``"dir"``);
- each client's pool is shuffled and cut 75/25 into train/test (PFLlib's
  ``split_data``); fedge can also carve a validation set out of the 75%.

Differences from PFLlib, on purpose: pixels are scaled to [0, 1] (PFLlib
normalises to [-1, 1] with mean 0.5, std 0.5; an affine change a first
layer absorbs); the random draws come from a seeded ``numpy.random.Generator``
(PFLlib: ``np.random.seed(1)``), so splits match PFLlib's in distribution,
not sample for sample.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdk.datasets.errors import DatasetFormatError, DatasetNotFoundError
from sdk.datasets.federated import FederatedDataset, client_ids, region_names, split_client
from sdk.datasets.partition import dirichlet_split

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_DIR",
    "ENV_VAR",
    "FashionMnistArrays",
    "dirichlet_split",
    "fashion_mnist_dir",
    "load_fashion_mnist",
    "read_fashion_mnist",
    "read_idx",
]

ENV_VAR = "FEDGE_FASHION_MNIST_DIR"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_INSTALL_HINT = f"apt-get install dataset-fashion-mnist, or set {ENV_VAR} to a folder holding the idx files"

# idx type codes (third magic byte) -> big-endian numpy dtype; see yann.lecun.com/exdb/mnist.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True, kw_only=True)
class FashionMnistArrays:
    """The four idx arrays as stored: uint8 images (n, 28, 28) and uint8 labels (n,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def fashion_mnist_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """The folder to read: ``directory`` if given, else ``$FEDGE_FASHION_MNIST_DIR``, else the Debian path."""
    if directory is not None:
        return Path(directory)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one idx file (plain or ``.gz``) into a native-endian array, checking magic and size."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fp:
            raw = fp.read()
    except (OSError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise DatasetNotFoundError(f"{path} not found: {_INSTALL_HINT}") from exc
        raise DatasetFormatError(f"{path}: cannot read: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(f"{path}: not an idx file (bad magic {raw[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetFormatError(f"{path}: {len(raw)} bytes, expected {expected} for shape {shape}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {directory}: {_INSTALL_HINT}")


def read_fashion_mnist(directory: str | os.PathLike[str] | None = None) -> FashionMnistArrays:
    """Read the 60k/10k Fashion-MNIST idx files from :func:`fashion_mnist_dir`."""
    folder = fashion_mnist_dir(directory)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"Fashion-MNIST folder {folder} does not exist: {_INSTALL_HINT}")
    arrays = {}
    for kind, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise DatasetFormatError(f"{folder}: {kind} images {images.shape} and labels {labels.shape} do not match")
        if labels.size and labels.max() >= len(CLASS_NAMES):
            raise DatasetFormatError(f"{folder}: {kind} labels outside [0, {len(CLASS_NAMES)})")
        arrays[f"{kind}_images"], arrays[f"{kind}_labels"] = images, labels
    return FashionMnistArrays(**arrays)


def load_fashion_mnist(
    *,
    num_clients: int = 20,
    alpha: float = 0.1,
    seed: int = 1,
    min_size: int = 40,
    test_fraction: float = 0.25,
    val_fraction: float = 0.0,
    subsample: float | None = None,
    num_regions: int | None = None,
    directory: str | os.PathLike[str] | None = None,
) -> FederatedDataset:
    """Fashion-MNIST pooled (70k) and split over ``num_clients`` with Dirichlet(``alpha``) skew.

    Images are float32 in [0, 1], shape (1, 28, 28). ``subsample`` keeps a
    seeded uniform random fraction of the pooled images before splitting
    (for tests and quick benchmarks); ``None`` keeps all. ``val_fraction`` of
    each client's training part becomes its validation split (0: empty).
    ``num_regions`` groups clients round-robin into ``region-<k>``; ``None``
    gives no regions. Raises DatasetNotFoundError (a FileNotFoundError)
    naming the Debian package when the files are missing.
    """
    if subsample is not None and not 0.0 < subsample <= 1.0:
        raise ValueError(f"subsample must be in (0, 1] or None, got {subsample!r}")
    raw = read_fashion_mnist(directory)
    images = np.concatenate([raw.train_images, raw.test_images])
    labels = np.concatenate([raw.train_labels, raw.test_labels]).astype(np.int64)
    rng = np.random.default_rng(seed)
    if subsample is not None and subsample < 1.0:
        keep = np.sort(rng.choice(len(labels), size=max(1, round(subsample * len(labels))), replace=False))
        images, labels = images[keep], labels[keep]
    parts = dirichlet_split(labels, num_clients=num_clients, alpha=alpha, rng=rng, min_size=min_size)
    ids = client_ids("fmnist", num_clients)
    regions = region_names(num_clients, num_regions)
    clients = tuple(
        split_client(client_id=ids[j], region=regions[j],
                     x=(images[idx].astype(np.float32) / np.float32(255.0))[:, None, :, :], y=labels[idx],
                     rng=rng, test_fraction=test_fraction, val_fraction=val_fraction)
        for j, idx in enumerate(parts)
    )
    kept = "all 70,000" if subsample is None or subsample == 1.0 else f"a {subsample:g} subsample of the 70,000"
    return FederatedDataset(
        name="fashion_mnist",
        clients=clients,
        input_shape=(1, 28, 28),
        num_classes=len(CLASS_NAMES),
        class_names=CLASS_NAMES,
        description=(f"Fashion-MNIST, {kept} train+test images pooled, Dirichlet(alpha={alpha}) label split over "
                     f"{num_clients} clients (PFLlib convention, min {min_size} per client), per-client shuffled "
                     f"{1 - test_fraction:.0%}/{test_fraction:.0%} train/test cut"
                     + (f", {val_fraction:.0%} of train held out for val" if val_fraction else "")
                     + f", seed {seed}"),
    )
