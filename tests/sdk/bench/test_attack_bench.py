"""The attack benchmark, small: real ORT training, real sealing and aggregators, three rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sdk.bench.attack_bench import format_table, run_attack, write_json
from sdk.cli.main import cli


def test_attack_bench_default_bounds_the_pull_the_unsafe_configuration_does_not(tmp_path: Path) -> None:
    runs = [run_attack(config, "both", 1, rounds=3) for config in ("default", "unsafe")]
    default, unsafe = runs
    # One attacker (norm 4.6e4, 10^12 samples): bounded to a fraction of an honest step by default ...
    assert default.excess_max < 1.0 and default.refused == 0
    # ... while without bounds it is thousands of honest steps (the field test's failure).
    assert unsafe.excess_max > 100.0
    assert default.accuracy > unsafe.accuracy
    out = tmp_path / "attack.json"
    write_json(runs, out, rounds=3, seed=0)
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "attack" and [r["config"] for r in doc["runs"]] == ["default", "unsafe"]
    assert doc["configs"]["unsafe"]["influence"]["norm"] == "unbounded"
    assert "default  both" in format_table(runs, rounds=3)


def test_attack_bench_refuses_an_unknown_run() -> None:
    with pytest.raises(ValueError):
        run_attack("default", "nonsense", 1, rounds=1)


def test_bench_attack_cli_rejects_zero_rounds() -> None:
    result = CliRunner().invoke(cli, ["bench", "attack", "--rounds", "0"])
    assert result.exit_code != 0 and "--rounds" in result.output
