"""The per-device view of a multi-seed setting (pure): ceilings, the statistics side by side, the best-of-rows bound."""

from __future__ import annotations

import pytest

from sdk.bench.accuracy_bench import AccuracySetting, format_table, summarise
from sdk.bench.accuracy_devices import best_of_rows, ceiling_devices, device_analysis, format_devices, row_shares

LOCAL = [{"a": 1.0, "b": 0.50, "c": 0.80}, {"a": 1.0, "b": 0.52, "c": 0.80}, {"a": 1.0, "b": 0.48, "c": 0.82}]
# a: at the ceiling, a tie; b: ahead by 0.10 every seed; c: gains 0, 0.05, 0.01 (mean 0.02 under its std 0.026)
ROW = [{"a": 1.0, "b": 0.60, "c": 0.80}, {"a": 1.0, "b": 0.62, "c": 0.85}, {"a": 1.0, "b": 0.58, "c": 0.83}]


def test_a_device_that_local_only_gets_all_right_is_at_the_ceiling() -> None:
    assert ceiling_devices(LOCAL) == ["a"]
    assert ceiling_devices([{"a": 1.0}, {"a": 0.99}]) == []


def test_row_shares_count_each_statistic_over_the_same_devices() -> None:
    s = row_shares("X", ROW, LOCAL)
    assert s.gain_mean == pytest.approx((0.0 + 0.10 + 0.02) / 3)
    assert s.clear == pytest.approx(1 / 3)  # b only
    assert s.clear_of_beatable == pytest.approx(1 / 2)  # a cannot gain
    assert s.any_gain == pytest.approx(2 / 3) and s.not_worse == pytest.approx(1.0)
    # global spread: std over seeds of the fleet mean gain (0.033, 0.05, 0.037: 0.009) is smaller, so c counts there
    assert s.clear_global == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="two or more seeds"):
        row_shares("X", ROW[:1], LOCAL[:1])


def test_best_of_rows_is_the_share_where_any_row_is_clearly_ahead() -> None:
    other = [{"a": 1.0, "b": 0.40, "c": 0.90}, {"a": 1.0, "b": 0.40, "c": 0.91}, {"a": 1.0, "b": 0.40, "c": 0.92}]
    share, ahead = best_of_rows({"X": ROW, "Y": other}, LOCAL)
    assert share == pytest.approx(2 / 3)
    assert ahead == {"a": [], "b": ["X"], "c": ["Y"]}


def test_the_setting_report_gains_a_per_device_section(tmp_path) -> None:
    setting = AccuracySetting(name="t-n10", title="test", dataset="digits", model="mlp", rounds=2, epochs=1, batch_size=16,
                              learning_rate=0.01, optimizer="adamw", runs=(), seeds=(0, 1, 2), per_class=10)

    def result(seed: int, label: str, algorithm: str, acc: dict[str, float]) -> dict:
        return {"label": label, "run": {"algorithm": algorithm}, "seed": seed, "parameters": 10, "head_parameters": 1,
                "seconds": 1.0, "test_examples": {"a": 10, "b": 20, "c": 50},
                "devices": {"a": {"train": 30, "classes": 2, "val": 6, "test": 10}},
                "final": {"personalised": acc, "global": {}, "regional": {}, "fine_tuned": {}},
                "rounds": [{"round": 0, "mean": 0.5, "pooled": 0.5, "bytes_up_per_device": 0, "bytes_down_per_device": 0}]}

    results = [r for k in range(3) for r in (result(k, "Local-only", "local", LOCAL[k]), result(k, "X", "fedalt", ROW[k]))]
    summary = summarise(setting, results)
    analysis = device_analysis(summary, results)
    assert analysis is not None and analysis["best"] == "X" and analysis["ceiling"] == ["a"]
    by_device = {d["device"]: d for d in analysis["devices"]}
    assert by_device["a"]["classes"] == 2 and by_device["b"]["clear"] and not by_device["c"]["clear"]
    text = format_devices(analysis)
    assert "| X | +4.00 | 33% | 50% | 67% | 67% | 100% |" in text
    assert "| a | 30 | 2 | 6 | 10 (10.0) | 100.00 ± 0.00 | +0.00 ± 0.00 | no | 0 |" in text
    assert "1 of 3 devices (a)" in text
    assert "Per device" not in format_table(setting, summary)  # the section is added by write_setting
    single = summarise(setting, [r for r in results if r["seed"] == 0])
    assert device_analysis(single, results[:2]) is None
