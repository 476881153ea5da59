"""The sensitivity sweep: the grid, the learning-rate choice (pure), and a real quick run through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sdk.bench.sweep import BASE_LR, EPOCH_LRS, LEARNING_RATES, recommend_learning_rate, sweep_points


def _point(dataset: str, algorithm: str, lr: float, mean: float, axis: str = "lr") -> dict:
    return {"point": {"axis": axis, "dataset": dataset, "algorithm": algorithm, "learning_rate": lr, "epochs": 1, "mu": None,
                      "personal_epochs": None}, "mu": 0.0, "mean": mean}


def test_recommended_learning_rate_minimises_the_worst_shortfall_not_the_best_score() -> None:
    results = [
        # a: best at 0.01 (0.95) but 0.01 collapses on b; 0.003 is never more than 3 points off
        _point("a", "fedalt", 0.001, 0.80), _point("a", "fedalt", 0.003, 0.92), _point("a", "fedalt", 0.01, 0.95),
        _point("b", "fedavg", 0.001, 0.70), _point("b", "fedavg", 0.003, 0.71), _point("b", "fedavg", 0.01, 0.40),
        _point("b", "fedavg", 0.003, 0.10, axis="mu"),  # other axes are ignored
    ]
    rec = recommend_learning_rate(results)
    assert rec["learning_rate"] == 0.003
    assert rec["worst_shortfall"] == {"0.001": pytest.approx(0.15), "0.003": pytest.approx(0.03), "0.01": pytest.approx(0.31)}
    assert {(r["dataset"], r["best_lr"]) for r in rec["per_setting"]} == {("a", 0.01), ("b", 0.003)}
    assert recommend_learning_rate([])["learning_rate"] is None


def test_sweep_grid_covers_each_axis_once_per_dataset() -> None:
    points = sweep_points(["watch", "digits"])
    assert len(points) == len(set(points)) == 2 * (3 * len(LEARNING_RATES) + 3 * len(EPOCH_LRS) * 2 + 2 * 3 + 2)
    assert {p.axis for p in points} == {"lr", "epochs", "mu", "personal_epochs"}
    assert all(p.learning_rate == BASE_LR for p in points if p.axis in ("mu", "personal_epochs"))
    assert BASE_LR in LEARNING_RATES  # the mu axis shares its mu=0 point with the lr axis


def test_fedge_bench_sweep_quick_writes_json_table_and_plot(tmp_path: Path) -> None:
    from sdk.cli.main import cli

    res = CliRunner().invoke(cli, ["bench", "sweep", "--quick", "--dataset", "digits", "--workers", "1", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert len(doc["results"]) == 4 and doc["recommendation"]["learning_rate"] in (0.001, 0.01)
    for r in doc["results"]:
        assert set(r["per_device"]) == {f"digits-{i:02d}" for i in range(10)} and len(r["rounds"]) == 2
    assert (tmp_path / "sweep.png").stat().st_size > 10_000 and "Recommended learning rate" in (tmp_path / "sweep.md").read_text()
    # --resume reuses every point already measured: nothing runs again, the numbers are the same.
    res = CliRunner().invoke(cli, ["bench", "sweep", "--quick", "--dataset", "digits", "--resume", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "sweep.json").read_text())
    assert again["reused_points"] == 4 and again["results"] == doc["results"]
    res = CliRunner().invoke(cli, ["bench", "sweep", "--quick", "--dataset", "digits", "--resume", "--seed", "3", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "seed 0" in res.output
    res = CliRunner().invoke(cli, ["bench", "sweep", "--dataset", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown datasets" in res.output
