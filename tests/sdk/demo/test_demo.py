"""``fedge demo`` end to end: real Mosquitto (root + two bridged regions), aggregator services, device agents.

Mosquitto is installed first when missing (as root), as the rest of the
``mosquitto``-marked suite does.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from sdk.cli.main import cli
from sdk.demo import DemoSettings, format_result, run_demo
from sdk.demo.report import RegionRound, parameter_shift

CHANCE = 1 / 7


@pytest.mark.mosquitto
def test_demo_eight_devices_two_rounds_all_accepted_and_above_chance() -> None:
    lines: list[RegionRound] = []
    result = run_demo(DemoSettings(devices=8, rounds=2, timeout_s=50.0), on_round=lines.append)

    assert result.workdir is None  # removed after the run
    assert [(r.round, r.region) for r in result.rounds] == [(0, "left"), (0, "right"), (1, "left"), (1, "right")]
    assert len(lines) == 4  # progress was reported as each region finished each round
    for line in result.rounds:
        assert len(line.statuses) == 4 and set(line.statuses.values()) == {"accepted"}, line
    assert result.all_accepted
    assert len({d for r in result.rounds for d in r.statuses}) == 8
    assert result.final_round == 2 and len(result.round_seconds) == 2
    assert result.global_shift > 0  # the root's global model moved
    assert [r.devices for r in result.regions] == [4, 4] and result.overall.devices == 8
    assert result.overall.personal_accuracy > CHANCE
    assert all(r.personal_accuracy > CHANCE for r in result.regions)
    table = format_result(result)
    assert "personalised acc" in table and "all            8" in table


def test_demo_settings_refuse_impossible_runs() -> None:
    with pytest.raises(ValueError, match="devices"):
        DemoSettings(devices=1)
    with pytest.raises(ValueError, match="devices"):
        DemoSettings(devices=21)
    with pytest.raises(ValueError, match="rounds"):
        DemoSettings(rounds=0)


def test_demo_parameter_shift_is_the_l2_norm_of_the_difference() -> None:
    import numpy as np

    before = {"a": np.zeros(3, np.float32), "b": np.ones((2,), np.float32)}
    after = {"a": np.array([3, 0, 0], np.float32), "b": np.array([1, 5], np.float32)}
    assert parameter_shift(before, after) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        parameter_shift(before, {"a": after["a"]})


def test_demo_cli_rejects_too_few_devices() -> None:
    outcome = CliRunner().invoke(cli, ["demo", "--devices", "1"])
    assert outcome.exit_code == 2 and "--devices" in outcome.output
