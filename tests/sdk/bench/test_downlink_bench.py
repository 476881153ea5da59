"""Smoke test of the downlink benchmark: 2 light devices, the watch model, real Mosquitto, q4 vs float32, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sdk.bench.downlink_bench import run
from sdk.cli.main import cli


@pytest.mark.mosquitto
def test_downlink_bench_devices_hold_the_publishers_model_and_q4_deltas_cost_a_fraction(tmp_path: Path, capsys) -> None:
    out = tmp_path / "downlink.json"
    rows = run(models=("watch",), specs=("q4",), devices=2, rounds=2, out=out)
    plain, q4 = rows
    assert (plain.compression, q4.compression) == ("none", "q4") and plain.params == 15911
    assert plain.bit_equal and q4.bit_equal
    assert plain.bytes_per_device_round == plain.full_message_bytes > 4 * 15911  # every round the full model
    assert 6 < q4.ratio == pytest.approx(plain.bytes_per_device_round / q4.bytes_per_device_round)
    assert q4.join_bytes > q4.full_message_bytes  # joining: the full model, then a round of both
    assert [r["compression"] for r in json.loads(out.read_text())] == ["none", "q4"]
    assert "bit-equal" in capsys.readouterr().out


def test_downlink_bench_command_names_bad_options_in_one_line() -> None:
    for args in (["--models", "cifar"], ["--specs", "q5"], ["--specs", "none"]):
        result = CliRunner().invoke(cli, ["bench", "downlink", *args])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
