"""Tests for sdk.datasets.watch: seglearn's smartwatch data as 20 clients, read without seglearn."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from sdk.datasets.federated import FederatedDataset
from sdk.datasets.watch import (
    RecordingSplit,
    TimeSplit,
    WatchRecordings,
    cut_windows,
    load_watch,
    read_watch_recordings,
    split_recordings,
)


@pytest.fixture(scope="module")
def recordings() -> WatchRecordings:
    return read_watch_recordings()


@pytest.fixture(scope="module")
def by_recording() -> FederatedDataset:
    return load_watch(seed=0)


@pytest.fixture(scope="module")
def by_time() -> FederatedDataset:
    return load_watch(seed=0, split=TimeSplit())


def test_read_watch_recordings_has_one_recording_per_client_and_class(recordings: WatchRecordings) -> None:
    assert len(recordings.signals) == 140
    assert all(s.ndim == 2 and s.shape[1] == 6 for s in recordings.signals)
    assert recordings.class_names == ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")
    per_client_class = Counter(zip(recordings.subjects.tolist(), recordings.sides, recordings.labels.tolist()))
    assert len(per_client_class) == 10 * 2 * 7 and set(per_client_class.values()) == {1}


def test_load_watch_never_imports_seglearn_or_pandas() -> None:
    code = ("import sys; from sdk.datasets.watch import load_watch; load_watch(); "
            "print('seglearn' in sys.modules, 'pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_load_watch_shapes_and_total_window_count(by_recording: FederatedDataset) -> None:
    assert len(by_recording.clients) == 20
    assert by_recording.input_shape == (6, 100) and by_recording.num_classes == 7
    assert by_recording.clients[0].client_id == "s01-left" and by_recording.clients[1].client_id == "s01-right"
    for client in by_recording.clients:
        for part in (client.train, client.val, client.test):
            assert part.x.dtype == np.float32 and part.y.dtype == np.int64 and part.x.shape[1:] == (6, 100)
    total = sum(by_recording.num_samples(s) for s in ("train", "val", "test"))
    assert total == 4677


def test_split_recordings_never_shares_a_recording_between_splits_or_clients(recordings: WatchRecordings) -> None:
    plan = split_recordings(recordings, RecordingSplit(), rng=np.random.default_rng(0))
    used = [s.recording for c in plan for part in (c.train, c.val, c.test) for s in part]
    assert sorted(used) == list(range(140))
    for client in plan:
        assert (len(client.train), len(client.val), len(client.test)) == (5, 1, 1)
        assert all(recordings.subjects[s.recording] == client.subject and recordings.sides[s.recording] == client.side
                   for part in (client.train, client.val, client.test) for s in part)


def test_load_watch_by_recording_test_windows_come_from_untrained_recordings(by_recording: FederatedDataset) -> None:
    # One recording per class per client: a held-out recording shows up as a class absent from train.
    for client in by_recording.clients:
        train_classes = set(client.train.y.tolist())
        assert len(set(client.test.y.tolist())) == 1 and not set(client.test.y.tolist()) & train_classes
        assert not set(client.val.y.tolist()) & train_classes
        train_windows = {w.tobytes() for w in client.train.x}
        assert not any(w.tobytes() in train_windows for w in client.test.x)


def test_load_watch_by_recording_rotates_held_out_classes_evenly(by_recording: FederatedDataset) -> None:
    held_out = Counter(int(c.test.y[0]) for c in by_recording.clients)
    assert len(held_out) == 7 and set(held_out.values()) <= {2, 3}


def test_load_watch_same_seed_identical_arrays_other_seed_differs(by_recording: FederatedDataset) -> None:
    again = load_watch(seed=0)
    for a, b in zip(by_recording.clients, again.clients):
        for name in ("train", "val", "test"):
            np.testing.assert_array_equal(a.split(name).x, b.split(name).x)
            np.testing.assert_array_equal(a.split(name).y, b.split(name).y)
    other = load_watch(seed=1)
    assert [int(c.test.y[0]) for c in other.clients] != [int(c.test.y[0]) for c in by_recording.clients]


def test_load_watch_standardises_with_training_statistics(by_recording: FederatedDataset) -> None:
    train = np.concatenate([c.train.x for c in by_recording.clients])
    np.testing.assert_allclose(train.mean(axis=(0, 2)), 0.0, atol=0.02)
    np.testing.assert_allclose(train.std(axis=(0, 2)), 1.0, atol=0.02)


def test_load_watch_by_time_every_split_has_every_class(by_time: FederatedDataset) -> None:
    for client in by_time.clients:
        for part in (client.train, client.val, client.test):
            assert set(part.y.tolist()) == set(range(7))


def test_split_recordings_by_time_segments_are_contiguous_and_disjoint(recordings: WatchRecordings) -> None:
    plan = split_recordings(recordings, TimeSplit(test_fraction=0.25, val_fraction=0.15), rng=np.random.default_rng(0))
    for client in plan:
        for train, val, test in zip(client.train, client.val, client.test):
            length = len(recordings.signals[train.recording])
            assert train.recording == val.recording == test.recording
            assert train.start == 0 and train.stop == val.start and val.stop == test.start and test.stop == length
            assert test.start == int(0.75 * length)


def test_time_split_train_fraction_keeps_the_start_of_each_training_segment(recordings: WatchRecordings,
                                                                          by_time: FederatedDataset) -> None:
    full = split_recordings(recordings, TimeSplit(), rng=np.random.default_rng(0))
    scarce = split_recordings(recordings, TimeSplit(train_fraction=0.2), rng=np.random.default_rng(0))
    for a, b in zip(full, scarce):
        assert a.val == b.val and a.test == b.test
        for whole, part in zip(a.train, b.train):
            assert part.start == 0 and part.stop == int(0.2 * whole.stop)
    few = load_watch(split=TimeSplit(train_fraction=0.2))
    assert 0.1 < few.num_samples("train") / by_time.num_samples("train") < 0.25
    assert few.num_samples("test") == by_time.num_samples("test")
    with pytest.raises(ValueError, match="train_fraction"):
        TimeSplit(train_fraction=0.0)


def test_load_watch_regions_by_side_and_subject_group(by_recording: FederatedDataset) -> None:
    assert by_recording.regions == ("left", "right")
    grouped = load_watch(regions_by="subject_group", num_subject_groups=2)
    assert grouped.regions == ("subjects-01-05", "subjects-06-10")
    assert Counter(c.region for c in grouped.clients) == {"subjects-01-05": 10, "subjects-06-10": 10}
    assert load_watch(regions_by=None).regions == ()


def test_cut_windows_known_answer() -> None:
    series = np.arange(250 * 2, dtype=np.float64).reshape(250, 2)
    windows = cut_windows(series, window=100, stride=50)
    assert windows.shape == (4, 2, 100)
    np.testing.assert_array_equal(windows[1], series[50:150].T)
    assert cut_windows(series[:99], window=100, stride=50).shape == (0, 2, 100)
