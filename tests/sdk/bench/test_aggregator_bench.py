"""Smoke test of the aggregator benchmark: tiny sizes, every path in a real subprocess, JSON shape, agreement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sdk.bench.aggregator_bench import FLOOR_MS, PARTS, format_table, prepare_updates, run_aggregator_bench, write_json, write_png
from sdk.cli.main import cli

TINY_SPEC = {"base.0.weight": (10, 90), "base.0.bias": (10,), "head.weight": (9, 10)}  # 1,000 parameters


def test_aggregator_bench_paths_agree_and_json_has_the_documented_shape(tmp_path: Path) -> None:
    rows = run_aggregator_bench(updates=(5,), spec=TINY_SPEC, repeats=1, batch=2, paths=("durable", "memory", "memory-batched", "members"))
    out = tmp_path / "aggregator.json"
    write_json(rows, out)
    doc = json.loads(out.read_text())

    assert doc["benchmark"] == "aggregator" and set(doc["machine"]) == {"python", "cpu_count", "platform"}
    assert doc["floor_ms"] == FLOOR_MS
    v1, row = doc["rows"]  # the same updates sealed in frame versions 1 and 2, side by side
    assert (v1["frame"], row["frame"]) == (1, 2) and v1["updates"] == row["updates"]
    assert v1["parts_ms"]["digest"] > 0 and v1["update_bytes"] == row["update_bytes"]
    assert row["parts_ms"]["prehash"] > 0 and row["parts_ms"]["ed25519"] > 0  # timed: no comparison (load)
    assert (row["updates"], row["parameters"], row["repeats"], row["batch"]) == (5, 1000, 1, 2)
    assert row["update_bytes"] > 4 * 1000
    assert set(row["paths"]) == {"durable", "memory", "memory-batched", "members"}
    for name, figures in row["paths"].items():
        assert set(figures) == {"updates_per_s", "loop_s", "finish_s", "peak_rss_mb", "rss_before_mb", "commit_ms", "cpu_ms",
                                "runq_ms", "lock_ms", "unqueued_loop_s"}
        assert figures["updates_per_s"] > 0 and figures["peak_rss_mb"] >= figures["rss_before_mb"] > 0
        assert (figures["commit_ms"] is None) == name.startswith("memory") == (figures["lock_ms"] is None)
        assert figures["runq_ms"] >= 0 and 0 < figures["unqueued_loop_s"] <= figures["loop_s"]
    assert set(row["parts_ms"]) == set(PARTS) and all(v >= 0 for v in row["parts_ms"].values())
    assert row["max_abs_diff"] <= 1e-5
    assert row["durable_vs_memory"] == pytest.approx(row["paths"]["durable"]["updates_per_s"] / row["paths"]["memory"]["updates_per_s"])
    assert row["durable_vs_memory_batched"] == pytest.approx(
        row["paths"]["durable"]["updates_per_s"] / row["paths"]["memory-batched"]["updates_per_s"])
    assert row["members_vs_durable"] == pytest.approx(row["paths"]["members"]["updates_per_s"] / row["paths"]["durable"]["updates_per_s"])
    assert row["members_vs_durable_runs"] == [pytest.approx(row["members_vs_durable"])]  # one repeat: its own ratio
    assert row["members_vs_durable_unqueued"] > 0
    assert row["durable_vs_unbatched"] is None and row["rss_ratio_naive_durable"] is None
    write_png(rows, tmp_path / "aggregator.png")
    assert (tmp_path / "aggregator.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(rows)
    assert "durable/memory" in table and "durable/memory-batched" in table and "2 members/1" in table and "ed25519" in table and "commit" in table
    assert "run-queue wait taken out" in table and "upd/CPU-s" in table
    assert "frame v2 / v1 updates/s" in table and "prehash" in table


def test_aggregator_bench_rejects_unknown_frame_versions() -> None:
    with pytest.raises(ValueError, match="frames"):
        run_aggregator_bench(updates=(2,), spec=TINY_SPEC, repeats=1, paths=("durable", "memory"), frames=(3,))


def test_aggregator_bench_reference_is_the_sample_weighted_mean(tmp_path: Path) -> None:
    _, index, reference = prepare_updates({"w": (3,)}, 3, tmp_path)
    assert len(index) == 3
    rngs = [np.random.default_rng(1000 + i).normal(scale=0.01, size=(3,)).astype(np.float32) for i in range(3)]
    samples = np.array([5, 42, 79], dtype=np.float64)  # 5 + (37 i) mod 200
    expected = sum(n * d.astype(np.float64) for n, d in zip(samples, rngs)) / samples.sum()
    np.testing.assert_allclose(reference["w"], expected.astype(np.float32), rtol=1e-6)


def test_aggregator_bench_rejects_a_run_without_both_paths() -> None:
    with pytest.raises(ValueError, match="durable"):
        run_aggregator_bench(updates=(2,), spec=TINY_SPEC, repeats=1, paths=("memory",))


def test_bench_aggregator_cli_rejects_bad_update_counts() -> None:
    result = CliRunner().invoke(cli, ["bench", "aggregator", "--updates", "5,x"])
    assert result.exit_code != 0 and "comma-separated integers" in result.output


def test_bench_aggregator_cli_rejects_paths_without_durable_and_memory() -> None:
    result = CliRunner().invoke(cli, ["bench", "aggregator", "--paths", "durable,naive"])
    assert result.exit_code == 2 and "including durable and memory" in result.output and "Traceback" not in result.output
