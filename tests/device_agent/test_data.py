"""Data adapters: arrays, .npz (no pickle), CSV, and bounded sensor-window streams."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.data import ArrayDataSource, collect_windows, load_csv, load_npz


def test_array_source_batches_cover_every_row_once():
    src = ArrayDataSource(np.arange(10).reshape(10, 1), np.arange(10))
    seen = np.concatenate([b.y for b in src.batches(3, rng=np.random.default_rng(0))])
    assert sorted(seen.tolist()) == list(range(10))
    assert [len(b.y) for b in src.batches(4)] == [4, 4, 2]
    with pytest.raises(ValueError, match="same number of rows"):
        ArrayDataSource(np.zeros((3, 2)), np.zeros(2))


def test_npz_source_refuses_pickled_objects(tmp_path):
    np.savez(tmp_path / "ok.npz", x=np.ones((4, 2), np.float32), y=np.arange(4))
    assert len(load_npz(tmp_path / "ok.npz")) == 4
    np.savez(tmp_path / "evil.npz", x=np.array([{"a": 1}], dtype=object), y=np.arange(1))
    with pytest.raises(ValueError, match="pickle"):
        load_npz(tmp_path / "evil.npz").x  # noqa: B018
    with pytest.raises(ValueError, match="missing arrays"):
        load_npz(tmp_path / "ok.npz", x_key="features")


def test_csv_source_reads_header_and_label_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,label,c\n1,2,0,3\n4,5,1,6\n")
    src = load_csv(path, label_column="label")
    np.testing.assert_array_equal(src.x, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(src.y, [0, 1])
    path.write_text("1,2,3,4,0\n5,6,7,8,1\n")
    assert load_csv(path, feature_shape=(2, 2)).x.shape == (2, 2, 2)
    path.write_text("1,2\n3,x\n")
    with pytest.raises(ValueError, match="non-numeric"):
        load_csv(path)


def test_window_stream_is_bounded():
    def sensor():
        i = 0
        while True:  # an endless sensor stream
            yield np.full((6, 100), i, np.float32), i % 7
            i += 1

    src = collect_windows(sensor, max_windows=50)
    assert src.x.shape == (50, 6, 100) and src.y[-1] == 49 % 7
    with pytest.raises(ValueError, match="different shapes"):
        collect_windows([(np.zeros(3), 0), (np.zeros(4), 1)], max_windows=5)
