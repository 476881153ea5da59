"""The training benchmark measures all three runtimes, keeps torch out of the agent processes, and writes JSON + PNG."""

from __future__ import annotations

import json

import pytest

from sdk.bench.train_bench import RUNTIMES, BenchModel, format_table, run_train_bench, write_json, write_png


def test_train_bench_measures_every_runtime_side_by_side(tmp_path):
    tiny = BenchModel(name="mlp-8-8-3", factory="PersonalizedMLP", kwargs={"in_features": 8, "hidden": [8], "num_classes": 3},
                      input_shape=(8,), classes=3, steps=20)
    rows = run_train_bench(models=(tiny,), batch=8, threads=1, repeats=1)
    (row,) = rows
    assert set(row.runtimes) == set(RUNTIMES)
    for name, figures in row.runtimes.items():
        assert figures.steps_per_s > 0 and figures.peak_rss_mb > 0 and figures.import_s > 0, name
        assert figures.gflops == pytest.approx(figures.percent_of_peak / 100 * row.sgemm_peak_gflops), name
        assert 0 < figures.percent_of_peak, name
        assert figures.gflops_per_cpu_s == pytest.approx(figures.percent_of_peak_cpu / 100 * row.sgemm_peak_gflops_per_cpu_s), name
        assert figures.gflops_per_cpu_s > 0, name
    assert row.mflop_per_step == 8 * (2 * 64 * 2 + 2 * 24 * 3) / 1e6  # Linear(8, 8) (first layer) + Linear(8, 3), batch 8
    assert row.sgemm_peak_gflops > 1.0
    assert row.runtimes["portable"].version.startswith("onnxruntime ")
    assert row.portable_vs_ort_training == row.runtimes["portable"].steps_per_s / row.runtimes["ort-training"].steps_per_s
    # without torch, the device processes stay far below PyTorch's footprint
    assert row.runtimes["portable"].peak_rss_mb < row.runtimes["torch"].peak_rss_mb
    assert "mlp-8-8-3" in format_table(rows)
    write_json(rows, tmp_path / "train.json", threads=1)
    doc = json.loads((tmp_path / "train.json").read_text())
    assert doc["rows"][0]["runtimes"]["portable"]["steps_per_s"] == row.runtimes["portable"].steps_per_s
    write_png(rows, tmp_path / "train.png")
    assert (tmp_path / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
