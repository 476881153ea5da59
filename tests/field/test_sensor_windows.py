"""The Raspberry Pi sensor adapter (examples/raspberry-pi/sensor_windows.py): stream -> windows -> the agent's data file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from device_agent.data import load_npz
from tests.example_modules import EXAMPLES, load_example

SCRIPT = EXAMPLES / "raspberry-pi" / "sensor_windows.py"
sw = load_example("raspberry-pi/sensor_windows.py")


def lines_for(labels: list[int | None], channels: int = 2) -> list[str]:
    """One line per sample: sample i has values (i, 100 + i, ...), its label from ``labels``."""
    out = []
    for i, label in enumerate(labels):
        values = ",".join(str(100 * c + i) for c in range(channels))
        out.append(f"{'-' if label is None else label},{values}\n")
    return out


def test_sensor_windows_cut_every_stride_with_channels_first() -> None:
    rejections = sw.Rejections()
    samples = sw.parse_samples(lines_for([3] * 10), channels=2, rejections=rejections)
    windows = list(sw.sliding_windows(samples, size=4, stride=2))
    # windows end at samples 3, 5, 7, 9 (one every 2 once 4 are buffered)
    assert [w[0][0].tolist() for w in windows] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert all(w.shape == (2, 4) and w.dtype == np.float32 for w, _ in windows)
    np.testing.assert_array_equal(windows[0][0][1], [100, 101, 102, 103])
    assert {label for _, label in windows} == {3}
    assert rejections.counts == {}


def test_sensor_windows_skip_windows_with_mixed_or_unknown_labels() -> None:
    labels: list[int | None] = [1, 1, 1, 1, 2, 2, 2, 2, None, 2, 2, 2, 2, 2]
    samples = sw.parse_samples(lines_for(labels), channels=2, rejections=sw.Rejections())
    windows = list(sw.sliding_windows(samples, size=4, stride=2))
    # candidate windows end at 3, 5, 7, 9, 11, 13: only [0..3] (all 1), [4..7] (all 2) and [10..13] (all 2) are pure
    assert [(w[0].tolist(), label) for w, label in windows] == [
        ([0, 1, 2, 3], 1), ([4, 5, 6, 7], 2), ([10, 11, 12, 13], 2)]


def test_sensor_windows_reject_bad_lines_by_reason_and_keep_going(caplog: pytest.LogCaptureFixture) -> None:
    lines = ["# a comment\n", "1,0,0\n", "1,0\n", "1,x,0\n", "x,0,0\n", "1,nan,0\n", "1,inf,0\n", "\n", "2,1,1\n"]
    rejections = sw.Rejections()
    samples = list(sw.parse_samples(lines, channels=2, rejections=rejections))
    assert [s.values for s in samples] == [(0.0, 0.0), (1.0, 1.0)]
    assert dict(rejections.counts) == {"field_count": 1, "not_a_number": 2, "not_finite": 2}
    assert sum("rejected" in r.getMessage() for r in caplog.records) == 5
    assert "line 3 rejected (field_count)" in caplog.text


def test_sensor_windows_file_keeps_the_newest_windows_and_is_replaced_whole(tmp_path: Path) -> None:
    out = tmp_path / "data" / "local.npz"
    windows = ((np.full((2, 3), i, dtype=np.float32), i % 3) for i in range(10))
    summary = sw.stream_to_file(windows, out=out, keep=4, flush_every=3)
    assert (summary.windows, summary.kept, summary.writes) == (10, 4, 4)  # chunks of 3, 3, 3, 1
    data = load_npz(out)
    assert data.x.shape == (4, 2, 3) and data.y.dtype == np.int64
    assert data.x[:, 0, 0].tolist() == [6, 7, 8, 9] and data.y.tolist() == [0, 1, 2, 0]
    assert sorted(p.name for p in out.parent.iterdir()) == ["local.npz"]  # no temporary file left


def test_sensor_windows_cli_reads_a_fifo_and_writes_what_the_agent_loads(tmp_path: Path) -> None:
    fifo = tmp_path / "imu.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "local.npz"
    rng = np.random.default_rng(0)
    labels = [0] * 250 + [1] * 250
    body = [f"{label}," + ",".join(f"{v:.5f}" for v in rng.normal(size=6)) + "\n" for label in labels]
    body.insert(100, "0,broken\n")

    def writer() -> None:
        with open(fifo, "w") as fh:  # blocks until the adapter opens its end
            fh.writelines(body)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--input", str(fifo), "--out", str(out), "--window", "100",
                           "--stride", "50", "--flush-every", "4", "--flatten"],
                          capture_output=True, text=True, timeout=60, check=False)
    thread.join(10)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    # per label: 250 samples -> windows ending at 99, 149, 199, 249 (4); the 3 straddling ones are dropped
    assert summary["windows"] == 8 and summary["kept"] == 8 and summary["rejected"] == {"field_count": 1}
    assert "line 101 rejected (field_count)" in proc.stderr
    data = load_npz(out)
    assert data.x.shape == (8, 600) and data.y.tolist() == [0] * 4 + [1] * 4


def test_sensor_windows_cli_usage_errors_exit_2_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--input", str(tmp_path / "absent"), "--out", str(tmp_path / "o.npz")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--input", "x", "--out", "y", "--window", "0"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "--window must be >= 1" in proc.stderr
