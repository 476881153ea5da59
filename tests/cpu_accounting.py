"""CPU seconds per test (this process plus the child processes it waited for), for keeping CI inside its budget.

Each test's CPU goes into its report (``user_properties``: ``cpu_s``; also in ``--junitxml``),
and the run ends with the tests that cost the most CPU and the total. Wall time
(``--durations``) says little on a 2-core machine running four workers; CPU seconds add up.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

_SHOWN = 25


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


_START = pytest.StashKey[float]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    item.stash[_START] = _cpu_seconds()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    if call.when != "teardown" or _START not in item.stash:
        return
    spent = ("cpu_s", round(_cpu_seconds() - item.stash[_START], 2))
    item.user_properties.append(spent)
    outcome.get_result().user_properties.append(spent)


class CpuSummary:
    """Collects the teardown reports (on the xdist controller too) and prints the costliest tests."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "teardown":
            value = dict(report.user_properties).get("cpu_s")
            if isinstance(value, (int, float)):
                self.spent[report.nodeid] = float(value)

    def pytest_terminal_summary(self, terminalreporter) -> None:  # type: ignore[no-untyped-def]
        if not self.spent:
            return
        tr = terminalreporter
        tr.write_sep("=", f"CPU seconds per test (process + waited-for children): top {_SHOWN}")
        for nodeid, value in sorted(self.spent.items(), key=lambda kv: -kv[1])[:_SHOWN]:
            tr.write_line(f"{value:8.1f}  {nodeid}")
        tr.write_line(f"{sum(self.spent.values()):8.1f}  total over {len(self.spent)} tests")
