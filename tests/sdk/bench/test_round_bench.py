"""Smoke test of the round benchmark: 5 devices, a tiny model, real Mosquitto, both store variants, JSON shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sdk.bench.round_bench import VARIANTS, format_table, run_round_bench, write_json
from sdk.cli.main import cli

TINY_SPEC = {"base.0.weight": (10, 90), "base.0.bias": (10,), "head.weight": (9, 10)}  # 1,000 parameters


@pytest.mark.mosquitto
def test_round_bench_every_device_gets_an_accepted_receipt_and_json_has_the_documented_shape(tmp_path: Path) -> None:
    rows = run_round_bench(models={"tiny": TINY_SPEC}, devices=5, repeats=1)
    out = tmp_path / "round.json"
    write_json(rows, out)
    doc = json.loads(out.read_text())

    assert doc["benchmark"] == "round" and set(doc["machine"]) == {"python", "cpu_count", "platform"}
    (row,) = doc["rows"]
    assert (row["model"], row["parameters"], row["devices"], row["repeats"]) == ("tiny", 1000, 5, 1)
    assert row["accepted_receipts"] == 5
    assert row["update_bytes"] > 4 * 1000
    assert set(row["variants"]) == set(VARIANTS)
    for figures in row["variants"].values():
        assert set(figures) == {"round_s", "last_receipt_s", "receipt_p50_ms", "receipt_p95_ms", "peak_rss_mb", "rss_ready_mb"}
        assert 0 < figures["last_receipt_s"] <= figures["round_s"] + 1.0
        assert 0 < figures["receipt_p50_ms"] <= figures["receipt_p95_ms"]
        assert figures["peak_rss_mb"] >= figures["rss_ready_mb"] > 0
    assert row["round_ratio_disk_tmpfs"] == pytest.approx(row["variants"]["disk"]["round_s"] / row["variants"]["tmpfs"]["round_s"])
    assert "accepted receipts 5/5" in format_table(rows)


def test_round_bench_rejects_a_run_without_the_disk_variant() -> None:
    with pytest.raises(ValueError, match="disk"):
        run_round_bench(models={"tiny": TINY_SPEC}, devices=1, repeats=1, variants=("tmpfs",))


def test_bench_round_cli_rejects_zero_devices() -> None:
    result = CliRunner().invoke(cli, ["bench", "round", "--devices", "0"])
    assert result.exit_code != 0 and "--devices" in result.output
