"""AccuracyHistory: means per round, a device replacing its own report, bounds."""

from __future__ import annotations

import math

import pytest

from sdk.dashboard.history import AccuracyHistory


def test_history_means_per_region_and_fleet() -> None:
    h = AccuracyHistory()
    h.record(device="a", region="eu", round=1, accuracy=0.5)
    h.record(device="b", region="eu", round=1, accuracy=0.7)
    h.record(device="c", region="us", round=1, accuracy=0.9)
    [point] = h.fleet()
    assert (point.round, point.devices) == (1, 3) and point.mean == pytest.approx(0.7)
    regions = h.regions()
    assert regions["eu"][0].mean == pytest.approx(0.6) and regions["us"][0].mean == pytest.approx(0.9)
    assert h.device("a") == [(1, 0.5)] and h.device("nobody") == []


def test_history_a_second_report_for_a_round_replaces_the_first() -> None:
    h = AccuracyHistory()
    h.record(device="a", region="eu", round=2, accuracy=0.2)
    h.record(device="b", region="eu", round=2, accuracy=0.4)
    h.record(device="a", region="eu", round=2, accuracy=0.6)
    [point] = h.fleet()
    assert point.devices == 2 and point.mean == pytest.approx(0.5)
    assert h.device("a") == [(2, 0.6)]


def test_history_is_bounded_and_ordered_and_ignores_non_finite() -> None:
    h = AccuracyHistory(rounds=3, device_rounds=2)
    for r in (5, 1, 4, 3, 2):
        h.record(device="a", region="eu", round=r, accuracy=r / 10)
    assert [p.round for p in h.fleet()] == [3, 4, 5]
    assert h.device("a") == [(4, 0.4), (5, 0.5)]  # the latest rounds, whatever the arrival order
    assert not h.record(device="a", region="eu", round=6, accuracy=math.nan)
    assert not h.record(device="a", region="eu", round=1, accuracy=0.1)  # older than the kept window
    with pytest.raises(ValueError):
        AccuracyHistory(rounds=0)
