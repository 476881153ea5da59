"""seglearn's smartwatch exercise data as 20 natural clients (10 subjects x left/right arm).

Source: Burns et al., "Personalized Activity Recognition with Deep Triplet
Embeddings" (arXiv:1802.01489), shipped with seglearn 1.2.5
(``seglearn/data/watch_dataset.npy``, read by ``seglearn.load_watch``). Each of
the 140 recordings is one set of 20 repetitions of one of 7 shoulder
exercises (PEN, ABD, FEL, IR, ER, TRAP, ROW), a (n_t, 6) accelerometer +
gyroscope series at 50 Hz, 947 to 2,618 steps long. Every (subject, arm)
pair has exactly **one recording per exercise**: 7 recordings per client.

We never import seglearn (its import needs pandas) and never
load the file with pickle-enabled ``np.load``: it is found with
``importlib.util.find_spec`` and read with the allow-list unpickler of
:mod:`sdk.datasets.restricted_pickle`.

Pipeline of :func:`load_watch`:

1. One client per (subject, arm), id ``s03-left``; region by arm
   (``left``/``right``), by subject group, or none.
2. Split. :class:`RecordingSplit` (default): whole recordings go to train,
   val or test, so no window of a held-out recording is ever trained on.
   Because a client has one recording per class, its test (and val)
   recording is a class it has **no** local training data for: per-client
   test accuracy then measures transfer from other clients, not
   personalisation. Held-out classes rotate round-robin over a seeded class
   order (client ``i`` tests class ``order[i % 7]``, validates on
   ``order[(i + 1) % 7]``), so the pooled test set is class-balanced.
   :class:`TimeSplit`: each recording is cut chronologically into
   train | val | test segments, so every split of every client has all 7
   classes and no time step is in two splits; windows of one set of
   repetitions do land in both train and test (later repetitions of the
   same set), the usual personalisation protocol.
3. Standardise each channel with the mean and std of every client's
   training steps pooled (a simulator convenience; a deployment would ship
   these constants with the model).
4. Cut windows of ``window`` steps every ``stride`` steps inside each
   segment (windows never cross a split boundary), channels first:
   (6, 100). The whole data gives 4,677 windows at 100/50.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sdk.datasets.errors import DatasetFormatError, DatasetNotFoundError
from sdk.datasets.federated import ClientData, FederatedDataset, LabeledArrays
from sdk.datasets.partition import check_fraction
from sdk.datasets.restricted_pickle import read_object_npy

RegionsBy = Literal["side", "subject_group"]
_RELATIVE_PATHS = ("data/watch_dataset.npy", "datasets/data/watch_dataset.npy")
_NUM_CHANNELS = 6


@dataclass(frozen=True, kw_only=True)
class WatchRecordings:
    """The raw recordings: ``signals[i]`` is a float64 (n_t, 6) array with label ``labels[i]``.

    ``sides`` holds ``"left"``/``"right"``; ``subjects`` the participant numbers.
    """

    signals: tuple[np.ndarray, ...]
    labels: np.ndarray
    subjects: np.ndarray
    sides: tuple[str, ...]
    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class RecordingSplit:
    """Hold out whole recordings: per client, ``test_recordings`` for test, ``val_recordings`` for val."""

    test_recordings: int = 1
    val_recordings: int = 1

    def __post_init__(self) -> None:
        if self.test_recordings < 0 or self.val_recordings < 0:
            raise ValueError("test_recordings and val_recordings must be >= 0")


@dataclass(frozen=True, kw_only=True)
class TimeSplit:
    """Cut every recording in time: the last ``test_fraction`` is test, ``val_fraction`` of the rest before it val.

    ``train_fraction`` < 1 keeps only the first part of each training segment
    (a device that has recorded only the first few repetitions: the scarce-data case).
    """

    test_fraction: float = 0.25
    val_fraction: float = 0.15
    train_fraction: float = 1.0

    def __post_init__(self) -> None:
        check_fraction("test_fraction", self.test_fraction)
        check_fraction("val_fraction", self.val_fraction)
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction!r}")


@dataclass(frozen=True, kw_only=True)
class Span:
    """Steps ``start:stop`` of recording ``recording``."""

    recording: int
    start: int
    stop: int


@dataclass(frozen=True, kw_only=True)
class ClientSpans:
    """Which pieces of which recordings form one client's train, val and test splits."""

    subject: int
    side: str
    train: tuple[Span, ...]
    val: tuple[Span, ...]
    test: tuple[Span, ...]


def watch_dataset_path() -> Path:
    """Where the installed seglearn keeps ``watch_dataset.npy`` (found without importing seglearn)."""
    spec = importlib.util.find_spec("seglearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        for relative in _RELATIVE_PATHS:
            candidate = Path(location) / relative
            if candidate.is_file():
                return candidate
    raise DatasetNotFoundError(
        "seglearn's watch_dataset.npy was not found: pip install seglearn==1.2.5 "
        f"(searched {[str(Path(loc) / r) for loc in locations for r in _RELATIVE_PATHS]})"
    )


def read_watch_recordings(path: str | os.PathLike[str] | None = None) -> WatchRecordings:
    """Read and check the recordings; ``path=None`` uses :func:`watch_dataset_path`."""
    source = Path(path) if path is not None else watch_dataset_path()
    stored = read_object_npy(source)
    data = stored.item() if stored.shape == () else None
    keys = {"X", "y", "subject", "side", "X_labels", "y_labels"}
    if not isinstance(data, dict) or not keys <= data.keys():
        raise DatasetFormatError(f"{source}: expected a dict with keys {sorted(keys)}")
    signals = tuple(np.asarray(s, dtype=np.float64) for s in data["X"])
    labels = np.asarray(data["y"]).astype(np.int64)
    subjects = np.asarray(data["subject"]).astype(np.int64)
    side_codes = np.asarray(data["side"])
    n = len(signals)
    if not (labels.shape == subjects.shape == side_codes.shape == (n,)):
        raise DatasetFormatError(f"{source}: X, y, subject and side lengths differ")
    if any(s.ndim != 2 or s.shape[1] != _NUM_CHANNELS or not np.isfinite(s).all() for s in signals):
        raise DatasetFormatError(f"{source}: every recording must be a finite (n_t, {_NUM_CHANNELS}) array")
    if not np.isin(side_codes, (0, 1)).all():
        raise DatasetFormatError(f"{source}: side must be 0 (left) or 1 (right)")
    class_names = tuple(str(c) for c in data["y_labels"])
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise DatasetFormatError(f"{source}: labels outside [0, {len(class_names)})")
    return WatchRecordings(
        signals=signals,
        labels=labels,
        subjects=subjects,
        sides=tuple("right" if code == 1 else "left" for code in side_codes),
        channel_names=tuple(str(c) for c in data["X_labels"]),
        class_names=class_names,
    )


def split_recordings(
    recordings: WatchRecordings, split: RecordingSplit | TimeSplit, *, rng: np.random.Generator
) -> tuple[ClientSpans, ...]:
    """Assign pieces of recordings to each (subject, side) client's train/val/test (see module docs).

    Clients come sorted by subject, then left before right. ``rng`` is used by
    :class:`RecordingSplit` only (the class order and ties within a class).
    """
    keys = sorted(set(zip(recordings.subjects.tolist(), recordings.sides)), key=lambda k: (k[0], k[1] != "left"))
    if isinstance(split, RecordingSplit):
        return _split_by_recording(recordings, keys, split, rng)
    if isinstance(split, TimeSplit):
        return _split_by_time(recordings, keys, split)
    raise TypeError(f"split must be a RecordingSplit or a TimeSplit, got {type(split).__name__}")


def _split_by_recording(
    recordings: WatchRecordings, keys: Sequence[tuple[int, str]], split: RecordingSplit, rng: np.random.Generator
) -> tuple[ClientSpans, ...]:
    held_out = split.test_recordings + split.val_recordings
    num_classes = len(recordings.class_names)
    class_order = rng.permutation(num_classes)
    clients = []
    for i, (subject, side) in enumerate(keys):
        mine = [r for r in range(len(recordings.signals))
                if recordings.subjects[r] == subject and recordings.sides[r] == side]
        if len(mine) <= held_out:
            raise ValueError(f"client s{subject:02d}-{side} has {len(mine)} recordings; {held_out} held out leaves none")
        # Client i's rotation of the class order decides which classes it holds out first;
        # the random tie-breaker orders several recordings of one class.
        rank = {int(c): (pos - i) % num_classes for pos, c in enumerate(class_order)}
        ties = rng.random(len(mine))
        ordered = [r for _, _, r in sorted(zip([rank[int(recordings.labels[r])] for r in mine], ties, mine))]
        whole = [Span(recording=r, start=0, stop=len(recordings.signals[r])) for r in ordered]
        clients.append(ClientSpans(
            subject=subject, side=side,
            test=tuple(whole[:split.test_recordings]),
            val=tuple(whole[split.test_recordings:held_out]),
            train=tuple(sorted(whole[held_out:], key=lambda s: s.recording)),
        ))
    return tuple(clients)


def _split_by_time(
    recordings: WatchRecordings, keys: Sequence[tuple[int, str]], split: TimeSplit
) -> tuple[ClientSpans, ...]:
    clients = []
    for subject, side in keys:
        parts: dict[str, list[Span]] = {"train": [], "val": [], "test": []}
        for r, signal in enumerate(recordings.signals):
            if recordings.subjects[r] != subject or recordings.sides[r] != side:
                continue
            length = len(signal)
            test_start = int((1.0 - split.test_fraction) * length)
            val_start = test_start - int(split.val_fraction * test_start)
            parts["train"].append(Span(recording=r, start=0, stop=int(split.train_fraction * val_start)))
            parts["val"].append(Span(recording=r, start=val_start, stop=test_start))
            parts["test"].append(Span(recording=r, start=test_start, stop=length))
        clients.append(ClientSpans(subject=subject, side=side, **{k: tuple(v) for k, v in parts.items()}))
    return tuple(clients)


def channel_statistics(recordings: WatchRecordings, spans: Sequence[Span]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float64, shape (6,)) over the steps of ``spans``; std 0 becomes 1."""
    steps = np.concatenate([recordings.signals[s.recording][s.start:s.stop] for s in spans], axis=0)
    mean = steps.mean(axis=0)
    std = steps.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def cut_windows(series: np.ndarray, *, window: int, stride: int) -> np.ndarray:
    """Windows of a (n_t, C) series as a (n_windows, C, window) array; none when n_t < window."""
    if window < 1 or stride < 1:
        raise ValueError("window and stride must be >= 1")
    if len(series) < window:
        return np.zeros((0, series.shape[1], window), dtype=series.dtype)
    return np.lib.stride_tricks.sliding_window_view(series, window, axis=0)[::stride]


def _windows(
    recordings: WatchRecordings, spans: Sequence[Span], mean: np.ndarray, std: np.ndarray, *, window: int, stride: int
) -> LabeledArrays:
    xs, ys = [np.zeros((0, _NUM_CHANNELS, window), dtype=np.float32)], [np.zeros(0, dtype=np.int64)]
    for span in spans:
        scaled = (recordings.signals[span.recording][span.start:span.stop] - mean) / std
        cut = cut_windows(scaled, window=window, stride=stride)
        xs.append(cut.astype(np.float32))
        ys.append(np.full(len(cut), recordings.labels[span.recording], dtype=np.int64))
    return LabeledArrays(x=np.ascontiguousarray(np.concatenate(xs)), y=np.concatenate(ys))


def load_watch(
    *,
    seed: int = 0,
    split: RecordingSplit | TimeSplit | None = None,
    regions_by: RegionsBy | None = "side",
    num_subject_groups: int = 2,
    window: int = 100,
    stride: int = 50,
    path: str | os.PathLike[str] | None = None,
) -> FederatedDataset:
    """The smartwatch data as 20 clients of standardised (6, ``window``) windows (see module docs).

    ``split=None`` means ``RecordingSplit()``: one test and one validation
    recording per client. ``regions_by="subject_group"`` puts the sorted
    subjects into ``num_subject_groups`` contiguous groups (region
    ``subjects-01-05``...); ``None`` gives no regions. ``path=None`` finds
    the file in the installed seglearn. The same arguments give identical arrays.
    """
    split = RecordingSplit() if split is None else split
    if regions_by not in ("side", "subject_group", None):
        raise ValueError(f"regions_by must be 'side', 'subject_group' or None, got {regions_by!r}")
    recordings = read_watch_recordings(path)
    subjects = np.unique(recordings.subjects)
    if not 1 <= num_subject_groups <= len(subjects):
        raise ValueError(f"num_subject_groups must be in [1, {len(subjects)}], got {num_subject_groups}")
    group_of = {int(subject): f"subjects-{int(group[0]):02d}-{int(group[-1]):02d}"
                for group in np.array_split(subjects, num_subject_groups) for subject in group}
    plan = split_recordings(recordings, split, rng=np.random.default_rng(seed))
    mean, std = channel_statistics(recordings, [s for c in plan for s in c.train])
    clients = tuple(
        ClientData(
            client_id=f"s{c.subject:02d}-{c.side}",
            region=None if regions_by is None else c.side if regions_by == "side" else group_of[c.subject],
            train=_windows(recordings, c.train, mean, std, window=window, stride=stride),
            val=_windows(recordings, c.val, mean, std, window=window, stride=stride),
            test=_windows(recordings, c.test, mean, std, window=window, stride=stride),
        )
        for c in plan
    )
    if isinstance(split, RecordingSplit):
        how = (f"split by recording: per client {split.test_recordings} test and {split.val_recordings} val "
               f"recording(s), held-out classes round-robin over a class order drawn with seed {seed}")
    else:
        how = (f"split in time: per recording the last {split.test_fraction:.0%} test, {split.val_fraction:.0%} "
               "of the rest before it val, the start train"
               + (f" (only its first {split.train_fraction:.0%} kept)" if split.train_fraction < 1.0 else ""))
    return FederatedDataset(
        name="watch",
        clients=clients,
        input_shape=(_NUM_CHANNELS, window),
        num_classes=len(recordings.class_names),
        class_names=recordings.class_names,
        description=(f"seglearn smartwatch IMU, {len(clients)} clients (subject x arm); {how}; channels "
                     f"standardised on pooled training steps; {window}-step windows, stride {stride}"),
    )
