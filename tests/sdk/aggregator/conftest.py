"""Fixtures for the aggregator tests: a started regional aggregator on a real SQLite file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sdk.aggregator import RegionalAggregator
from tests.sdk.aggregator import scenario


@pytest.fixture
def clock() -> scenario.StepClock:
    """A monotonic clock the test moves by hand."""
    return scenario.StepClock()


@pytest.fixture
def open_region(tmp_path: Path, clock: scenario.StepClock) -> Iterator[Callable[..., RegionalAggregator]]:
    """open_region(name="eu", db="eu.sqlite", **config overrides) -> an aggregator on tmp_path/db; all closed at teardown."""
    opened: list[RegionalAggregator] = []

    def open_(region: str = "eu", *, db: str | None = None, member: str = "main", **overrides: Any) -> RegionalAggregator:
        overrides.setdefault("clock", clock)
        config = scenario.regional_config(region, **overrides)
        aggregator = RegionalAggregator.open(tmp_path / (db or f"{region}.sqlite"), config, member=member)
        opened.append(aggregator)
        return aggregator

    yield open_
    for aggregator in opened:
        aggregator.close()


@pytest.fixture
def region(open_region: Callable[..., RegionalAggregator]) -> RegionalAggregator:
    """The ``eu`` aggregator with round 0 started from the initial model."""
    aggregator = open_region()
    aggregator.start_round(0, scenario.initial_model())
    return aggregator
