"""Bounded learning history: accuracy over rounds per device, per region and fleet-wide (pure, in memory).

Devices report the validation accuracy of their personalised model in
their signed status after each round; this keeps, per round, the sum and
count of the latest report of every device (a device that reports twice for
one round replaces its own contribution), and per device its last
``device_rounds`` reports. Only the last ``rounds`` rounds are kept: memory
is O(rounds x regions + devices x device_rounds), whatever the run length.
The history starts empty when the dashboard starts (docs/operations.md says why).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class AccuracyPoint:
    """The mean accuracy over ``devices`` reports for one round."""

    round: int
    mean: float
    devices: int


class AccuracyHistory:
    """Accuracy over rounds (module docstring); ``rounds`` and ``device_rounds`` bound it."""

    def __init__(self, *, rounds: int = 200, device_rounds: int = 50) -> None:
        if rounds < 1 or device_rounds < 1:
            raise ValueError("rounds and device_rounds must be >= 1")
        self._rounds = rounds
        self._device_rounds = device_rounds
        #: round -> region -> [sum, count]
        self._sums: OrderedDict[int, dict[str, list[float]]] = OrderedDict()
        self._devices: dict[str, list[tuple[int, float]]] = {}
        self._regions: dict[str, str] = {}

    def record(self, *, device: str, region: str, round: int, accuracy: float) -> bool:
        """Take one device's accuracy for ``round``; False (ignored) for a non-finite value or a round older than kept."""
        if not math.isfinite(accuracy) or round < 0:
            return False
        if self._sums and round < next(iter(self._sums)) and len(self._sums) >= self._rounds:
            return False
        series = self._devices.setdefault(device, [])
        previous = next((acc for r, acc in series if r == round), None)
        old_region = self._regions.get(device, region)
        self._regions[device] = region
        out_of_order = round not in self._sums and bool(self._sums) and round < next(reversed(self._sums))
        per_region = self._sums.setdefault(round, {})
        if out_of_order:
            self._sums = OrderedDict(sorted(self._sums.items()))
        if previous is not None:
            stale = per_region.get(old_region)
            if stale is not None:
                stale[0] -= previous
                stale[1] -= 1
            series.remove((round, previous))
        cell = per_region.setdefault(region, [0.0, 0])
        cell[0] += accuracy
        cell[1] += 1
        series.append((round, accuracy))
        if len(series) > 1 and series[-2][0] > round:
            series.sort()
        del series[: max(0, len(series) - self._device_rounds)]  # keep the latest rounds
        while len(self._sums) > self._rounds:
            self._sums.popitem(last=False)
        return True

    def forget(self, device: str) -> None:
        """Drop a device's own series (its past contributions to the means stay)."""
        self._devices.pop(device, None)
        self._regions.pop(device, None)

    def fleet(self) -> list[AccuracyPoint]:
        """The fleet-wide mean per round (every region's reports together), oldest first."""
        out = []
        for round, per_region in self._sums.items():
            total = sum(cell[0] for cell in per_region.values())
            count = int(sum(cell[1] for cell in per_region.values()))
            if count > 0:
                out.append(AccuracyPoint(round=round, mean=total / count, devices=count))
        return out

    def regions(self) -> dict[str, list[AccuracyPoint]]:
        """Per region, its mean per round, oldest first."""
        out: dict[str, list[AccuracyPoint]] = {}
        for round, per_region in self._sums.items():
            for region, (total, count) in sorted(per_region.items()):
                if count > 0:
                    out.setdefault(region, []).append(AccuracyPoint(round=round, mean=total / count, devices=int(count)))
        return out

    def device(self, device: str) -> list[tuple[int, float]]:
        """(round, accuracy) of one device, oldest first; empty when unknown."""
        return list(self._devices.get(device, ()))

    def devices(self) -> dict[str, list[tuple[int, float]]]:
        """Every device's series (device -> (round, accuracy) oldest first)."""
        return {device: list(series) for device, series in sorted(self._devices.items())}
