"""Tests for sdk.datasets.fashion_mnist: idx parsing, file lookup and the PFLlib-style Dirichlet split.

Tests marked ``needs_files`` read Debian's ``dataset-fashion-mnist``; they are
skipped (never installed from here) when its folder is absent.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from sdk.datasets.errors import DatasetFormatError, DatasetNotFoundError
from sdk.datasets.fashion_mnist import ENV_VAR, fashion_mnist_dir, load_fashion_mnist, read_idx
from sdk.datasets.federated import FederatedDataset

needs_files = pytest.mark.skipif(
    not fashion_mnist_dir().is_dir(),
    reason=f"Fashion-MNIST not in {fashion_mnist_dir()} (apt-get install dataset-fashion-mnist or set {ENV_VAR})",
)


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _fake_fashion_mnist(folder: Path, *, n_train: int = 400, n_test: int = 100) -> Path:
    """Tiny idx files in the Debian layout (gzipped), labels cycling through the 10 classes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    return folder


def test_read_idx_plain_and_gzip_known_answer(tmp_path: Path) -> None:
    values = np.array([[1, -2, 300], [4, 5, -6]], dtype=np.int32)
    (tmp_path / "a-idx2-int").write_bytes(_idx_bytes(values, 0x0C))
    (tmp_path / "a-idx2-int.gz").write_bytes(gzip.compress(_idx_bytes(values, 0x0C)))
    for name in ("a-idx2-int", "a-idx2-int.gz"):
        loaded = read_idx(tmp_path / name)
        np.testing.assert_array_equal(loaded, values)
        assert loaded.dtype == np.dtype("int32") and loaded.dtype.isnative


def test_read_idx_rejects_bad_magic_and_wrong_size(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(DatasetFormatError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros(5, np.uint8))[:-1])
    with pytest.raises(DatasetFormatError, match="expected"):
        read_idx(tmp_path / "short")


def test_load_fashion_mnist_missing_folder_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist(directory=tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(directory=tmp_path / "empty")


def test_load_fashion_mnist_reads_the_env_var_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(_fake_fashion_mnist(tmp_path / "fmnist")))
    data = load_fashion_mnist(num_clients=5, alpha=1.0, min_size=10)
    assert data.num_samples("train") + data.num_samples("test") == 500
    assert data.clients[0].train.x.shape[1:] == (1, 28, 28)


def test_load_fashion_mnist_same_seed_identical_arrays(tmp_path: Path) -> None:
    folder = _fake_fashion_mnist(tmp_path / "fmnist")
    a, b = (load_fashion_mnist(directory=folder, num_clients=5, alpha=0.5, min_size=10, seed=3) for _ in range(2))
    for ca, cb in zip(a.clients, b.clients):
        np.testing.assert_array_equal(ca.train.x, cb.train.x)
        np.testing.assert_array_equal(ca.test.y, cb.test.y)


@pytest.fixture(scope="module")
def fmnist_small() -> FederatedDataset:
    return load_fashion_mnist(subsample=0.05, min_size=10, seed=1)


@needs_files
def test_load_fashion_mnist_shapes_and_range(fmnist_small: FederatedDataset) -> None:
    assert len(fmnist_small.clients) == 20 and fmnist_small.input_shape == (1, 28, 28)
    for client in fmnist_small.clients:
        assert client.train.x.dtype == np.float32 and client.train.x.shape[1:] == (1, 28, 28)
        assert 0.0 <= client.train.x.min() and client.train.x.max() <= 1.0
        assert len(client.val) == 0


@needs_files
def test_load_fashion_mnist_subsample_is_split_exactly_once_75_25(fmnist_small: FederatedDataset) -> None:
    assert fmnist_small.num_samples("train") + fmnist_small.num_samples("test") == 3500
    for client in fmnist_small.clients:
        n = len(client.train) + len(client.test)
        assert len(client.train) == int(0.75 * n)


@needs_files
def test_load_fashion_mnist_dirichlet_0_1_is_label_skewed(fmnist_small: FederatedDataset) -> None:
    counts = fmnist_small.class_counts("train") + fmnist_small.class_counts("test")
    shares = counts / counts.sum(axis=1, keepdims=True)
    assert (counts > 0).sum(axis=1).mean() < 7.0
    assert shares.max(axis=1).mean() > 0.4  # a dominant class per client; IID would give ~0.1


@needs_files
def test_load_fashion_mnist_real_files_same_seed_identical(fmnist_small: FederatedDataset) -> None:
    again = load_fashion_mnist(subsample=0.05, min_size=10, seed=1)
    for a, b in zip(fmnist_small.clients, again.clients):
        np.testing.assert_array_equal(a.train.x, b.train.x)
        np.testing.assert_array_equal(a.test.y, b.test.y)
