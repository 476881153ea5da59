"""Data adapters: how a device feeds its own local data to the trainer.

Every adapter is a :class:`DataSource`: a finite, re-iterable set of examples
the trainer draws mini-batches from. Files are read with numpy only
(``allow_pickle=False`` for ``.npz``), so a data file can never execute code.
"""

from __future__ import annotations

import csv
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


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


def load_npz(path: str | os.PathLike[str], *, x_key: str = "x", y_key: str = "y") -> ArrayDataSource:
    """Load ``x``/``y`` arrays from an ``.npz`` file (pickled objects are refused)."""
    with np.load(Path(path), allow_pickle=False) as data:
        missing = [k for k in (x_key, y_key) if k not in data.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; it has {data.files}")
        return ArrayDataSource(data[x_key], data[y_key])


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
    """
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, delimiter=delimiter))
    if not rows:
        raise ValueError(f"{path}: empty CSV")
    header: list[str] | None = None
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        header, rows = rows[0], rows[1:]
    if isinstance(label_column, str):
        if header is None or label_column not in header:
            raise ValueError(f"{path}: no column named {label_column!r} (header: {header})")
        col = header.index(label_column)
    else:
        col = label_column
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: non-numeric or ragged rows: {exc}") from exc
    if table.ndim != 2 or table.shape[1] < 2:
        raise ValueError(f"{path}: need at least one feature column and a label column")
    y = table[:, col].astype(label_dtype)
    x = np.delete(table, col, axis=1).astype(np.float32)
    if feature_shape is not None:
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
