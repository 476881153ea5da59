"""Data adapters: how a device feeds its own local data to the trainer.

Every adapter is a :class:`DataSource`: a finite, re-iterable set of examples
the trainer draws mini-batches from. ``.npz`` members are parsed header first
(numeric dtypes only, sizes bounded before anything is allocated) and never
unpickled, so a data file can never execute code; every content problem
raises :class:`DataFileError` naming the file.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from device_agent.errors import FedgeError
from device_agent.npy_header import NpyFormatError, read_npy_data, read_npy_header


@dataclass(frozen=True, kw_only=True)
class Batch:
    """One mini-batch: features ``x`` and labels ``y`` with equal first dimensions."""

    x: np.ndarray
    y: np.ndarray


@runtime_checkable
class DataSource(Protocol):
    """A finite local dataset the trainer can iterate in mini-batches."""

    def __len__(self) -> int:
        """Number of examples."""
        ...

    def batches(self, batch_size: int, *, rng: np.random.Generator | None = None) -> Iterator[Batch]:
        """One pass over the data; shuffled when ``rng`` is given, in order when None."""
        ...


class ArrayDataSource:
    """Examples held in memory as two arrays (``x[i]``, ``y[i]``)."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x)
        y = np.asarray(y)
        if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y need the same number of rows, got {x.shape} and {y.shape}")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int, *, rng: np.random.Generator | None = None) -> Iterator[Batch]:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        n = len(self)
        order = rng.permutation(n) if rng is not None else np.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield Batch(x=self.x[idx], y=self.y[idx])


class DataFileError(FedgeError, ValueError):
    """A local data file cannot be used; the message names the file and what is wrong with it."""


#: Largest array a data file may declare (bytes, per array): a forged header must not make the device allocate gigabytes.
MAX_ARRAY_BYTES = 1 << 30
_NUMERIC_KINDS = "biuf"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


def load_npz(path: str | os.PathLike[str], *, x_key: str = "x", y_key: str = "y",
             max_array_bytes: int = MAX_ARRAY_BYTES) -> ArrayDataSource:
    """Load ``x``/``y`` arrays from an ``.npz`` file (``np.savez``): numeric arrays only, never pickled objects.

    Every problem raises DataFileError naming the file: a ``.npy`` or any
    other non-zip file, a missing array, an array holding Python objects, a
    damaged member, or an array larger than ``max_array_bytes``. A missing or
    unreadable file raises OSError.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic.startswith(_NPY_MAGIC):
        raise DataFileError(f"{path}: a .npy file (one array); fedge reads an .npz with arrays "
                            f"{x_key!r} and {y_key!r}, e.g. numpy.savez(path, {x_key}=features, {y_key}=labels)")
    if not magic.startswith(_ZIP_MAGICS):
        raise DataFileError(f"{path}: not an .npz file (an .npz is a zip archive written by numpy.savez)")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name[:-4] if name.endswith(".npy") else name: name for name in archive.namelist()}
            missing = [k for k in (x_key, y_key) if k not in members]
            if missing:
                raise DataFileError(f"{path}: missing arrays {missing}; it has {sorted(members)}")
            x, y = (_read_npy_member(archive, members[k], path, k, max_array_bytes) for k in (x_key, y_key))
    except DataFileError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError, OverflowError,
            KeyError, struct.error, OSError) as exc:  # OSError here: a forged member offset (the file itself opened)
        raise DataFileError(f"{path}: damaged .npz file: {exc}") from exc
    try:
        return ArrayDataSource(x, y)
    except ValueError as exc:
        raise DataFileError(f"{path}: {exc}") from exc


def _read_npy_member(archive: zipfile.ZipFile, member: str, path: Path, key: str, limit: int) -> np.ndarray:
    """One ``.npy`` member, header checked before any allocation (numeric dtype, declared size within ``limit``)."""
    info = archive.getinfo(member)
    if info.file_size > limit + 65536:
        raise DataFileError(f"{path}: array {key!r} is {info.file_size} bytes, over the {limit}-byte limit")
    with archive.open(info) as fh:
        try:  # our own strict parser: numpy's uses ast, which CPython 3.11 cannot run in two threads at once
            header = read_npy_header(fh)
        except NpyFormatError as exc:
            raise DataFileError(f"{path}: array {key!r}: {exc}") from None
        shape, dtype = header.shape, header.dtype
        if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
            raise DataFileError(f"{path}: array {key!r} has dtype {dtype}; only numeric arrays are read "
                                "(arrays of Python objects would need pickle, which fedge never loads)")
        size = math.prod(shape) * dtype.itemsize
        if size > limit:
            raise DataFileError(f"{path}: array {key!r} declares shape {shape} ({size} bytes), over the {limit}-byte limit")
        try:
            return read_npy_data(fh, header)
        except NpyFormatError as exc:
            raise DataFileError(f"{path}: array {key!r} is {exc}") from None


def load_csv(
    path: str | os.PathLike[str],
    *,
    label_column: str | int = -1,
    feature_shape: tuple[int, ...] | None = None,
    label_dtype: str = "int64",
    delimiter: str = ",",
) -> ArrayDataSource:
    """Load a CSV of numeric features and one label column (by header name or index).

    A header row is detected when its cells are not numbers. ``feature_shape``
    reshapes each row's features (e.g. ``(6, 100)`` for flattened sensor windows).
    Integer labels must be whole numbers. DataFileError (naming the file) for
    any content problem; OSError when the file cannot be read.
    """
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [row for row in csv.reader(fh, delimiter=delimiter) if row]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataFileError(f"{path}: not a readable UTF-8 CSV file: {exc}") from exc
    if not rows:
        raise DataFileError(f"{path}: empty CSV")
    header: list[str] | None = None
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        header, rows = rows[0], rows[1:]
    if isinstance(label_column, str):
        if header is None or label_column not in header:
            raise DataFileError(f"{path}: no column named {label_column!r} (header: {header})")
        col = header.index(label_column)
    else:
        col = label_column
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError as exc:
        raise DataFileError(f"{path}: non-numeric or ragged rows: {exc}") from exc
    if table.ndim != 2 or table.shape[1] < 2 or table.shape[0] < 1:
        raise DataFileError(f"{path}: need at least one row with a feature column and a label column")
    if not -table.shape[1] <= col < table.shape[1]:
        raise DataFileError(f"{path}: label column {col} is out of range ({table.shape[1]} columns)")
    labels = table[:, col]
    if np.dtype(label_dtype).kind in "iu" and not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
        raise DataFileError(f"{path}: labels in column {col} must be whole numbers")
    y = labels.astype(label_dtype)
    x = np.delete(table, col, axis=1).astype(np.float32)
    if feature_shape is not None:
        if math.prod(feature_shape) != x.shape[1]:
            raise DataFileError(f"{path}: {x.shape[1]} feature columns cannot be reshaped to {tuple(feature_shape)}")
        x = x.reshape((x.shape[0], *feature_shape))
    return ArrayDataSource(x, y)


def collect_windows(
    windows: Iterable[tuple[np.ndarray, object]] | Callable[[], Iterable[tuple[np.ndarray, object]]],
    *,
    max_windows: int,
) -> ArrayDataSource:
    """Drain up to ``max_windows`` (window, label) pairs from a sensor stream into memory.

    The bound keeps RAM fixed on a device whose stream never ends; pass a
    callable to re-open the stream each round.
    """
    if max_windows < 1:
        raise ValueError("max_windows must be >= 1")
    source = windows() if callable(windows) else windows
    xs, ys = [], []
    for x, y in itertools.islice(source, max_windows):
        xs.append(np.asarray(x, dtype=np.float32))
        ys.append(y)
    if not xs:
        raise ValueError("the window stream produced no data")
    shapes = {x.shape for x in xs}
    if len(shapes) != 1:
        raise ValueError(f"windows have different shapes: {sorted(shapes)}")
    return ArrayDataSource(np.stack(xs), np.asarray(ys))
