"""The dashboard's picture of the fleet (pure): verified statuses, aggregator readings and announcements in,
one JSON-ready snapshot out.

Everything here was checked before it arrives (signed statuses and models,
parsed scrapes); what the snapshot carries is plain data for the page, which
renders it as text only. ``version`` grows with every change so the server
pushes a snapshot only when something moved.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from device_agent.protocol.status import DeviceStatus, ReleaseState
from sdk.dashboard.aggregators import AggregatorReading, RoundLog
from sdk.dashboard.history import AccuracyHistory
from sdk.dashboard.rollout import RolloutReading

#: Most device rows a snapshot carries (problems first); the page says how many it left out.
MAX_DEVICE_ROWS = 500
#: Closed rounds per aggregator in a snapshot's table.
SNAPSHOT_ROUNDS = 20
#: Round outcomes a device reports that mean its last round did not count (``trained``, ``stale``... are normal).
FAILING_OUTCOMES = frozenset({"rejected", "refused", "failed", "no_receipt"})


@dataclass(frozen=True, kw_only=True)
class AggregatorState:
    """The last scrape of one endpoint: a reading, or why there is none (``error``)."""

    url: str
    reading: AggregatorReading | None
    error: str
    scraped_at: float


class FleetView:
    """The fleet as the dashboard sees it (module docstring). ``wall_clock`` stamps what arrives."""

    def __init__(self, *, fleet: str, history_rounds: int = 200, device_rounds: int = 50,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.fleet = fleet
        self.version = 0
        self.history = AccuracyHistory(rounds=history_rounds, device_rounds=device_rounds)
        self._history_rounds = history_rounds
        self._clock = wall_clock
        self._statuses: dict[str, DeviceStatus] = {}
        self._received: dict[str, float] = {}
        self._aggregators: dict[str, AggregatorState] = {}
        self._round_logs: dict[str, RoundLog] = {}
        self._bridges: dict[str, bool] = {}
        self._models: dict[str, int] = {}
        self._rollout: RolloutReading | None = None
        self.rejected_messages: Counter[str] = Counter()

    # -- inputs ---------------------------------------------------------------------------------

    def apply_status(self, status: DeviceStatus) -> bool:
        """Take a verified status; False (ignored) when older than the one held (by timestamp, then sequence),
        except that an offline status (a last will is built at connect time) always sets the device offline."""
        held = self._statuses.get(status.device)
        if held is not None and (status.timestamp_ms, status.sequence) < (held.timestamp_ms, held.sequence):
            if status.online or not held.online:
                return False
        self._statuses[status.device] = status
        self._received[status.device] = self._clock()
        if status.last_round is not None and status.last_val_accuracy is not None:
            self.history.record(device=status.device, region=status.region, round=status.last_round,
                                accuracy=status.last_val_accuracy)
        self._changed()
        return True

    def apply_reading(self, url: str, reading: AggregatorReading | None, error: str = "") -> None:
        """Take one scrape of ``url`` (``reading`` None: it failed, ``error`` says why)."""
        before = self._aggregators.get(url)
        self._aggregators[url] = AggregatorState(url=url, reading=reading, error=error, scraped_at=self._clock())
        changed = before is None or before.reading != reading or before.error != error
        if reading is not None:
            changed = self._round_logs.setdefault(url, RoundLog(self._history_rounds)).take(reading) or changed
        if changed:
            self._changed()

    def apply_bridge(self, region: str, up: bool) -> None:
        """A region's bridge state (Mosquitto's retained notification at the root)."""
        if self._bridges.get(region) != up:
            self._bridges[region] = up
            self._changed()

    def apply_model(self, source: str, round: int) -> None:
        """A verified model announcement: ``source`` is ``root`` or a region."""
        if self._models.get(source) != round:
            self._models[source] = round
            self._changed()

    def apply_rollout(self, reading: RolloutReading) -> None:
        """The controller's stages as the verified release metadata says (:mod:`sdk.dashboard.rollout`)."""
        if reading != self._rollout:
            self._rollout = reading
            self._changed()

    def reject(self, what: str) -> None:
        """Count a message that was refused before it reached the view (bad signature, malformed, unknown device)."""
        self.rejected_messages[what] += 1
        self._changed()

    def _changed(self) -> None:
        self.version += 1

    # -- output ---------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, as plain JSON-ready data (module docstring)."""
        statuses = list(self._statuses.values())
        now = self._clock()
        readings = [s.reading for s in self._aggregators.values() if s.reading is not None]
        root = next((r for r in readings if r.tier == "root"), None)
        problems = self._problems(statuses)
        rows = sorted(statuses, key=lambda s: (_healthy(s), s.region, s.device))
        return {
            "fleet": self.fleet,
            "version": self.version,
            "generated_at": now,
            "summary": {
                "devices": len(statuses),
                "online": sum(1 for s in statuses if s.online),
                "regions": len({s.region for s in statuses} | {r.region for r in readings if r.tier == "regional"}),
                "round": None if root is None else root.round,
                "collecting": None if root is None else root.collecting,
                "root_model_round": self._models.get("root"),
            },
            "problems": problems,
            "regions": self._regions(statuses, readings),
            "devices": [self._device_row(s, now) for s in rows[:MAX_DEVICE_ROWS]],
            "devices_left_out": max(0, len(rows) - MAX_DEVICE_ROWS),
            "aggregators": [self._aggregator_row(state) for state in sorted(self._aggregators.values(), key=_agg_order)],
            "rounds": self._rounds(),
            "versions": [{"model": model, "version": version, "devices": n}
                         for (model, version), n in sorted(Counter((s.bundle_model or "", s.bundle_version)
                                                                   for s in statuses).items(), key=_version_order)],
            "backends": dict(sorted(Counter(s.backend or "unknown" for s in statuses).items())),
            "release": self._release(statuses),
            "rollout": None if self._rollout is None else {
                "releases": list(self._rollout.releases), "error": self._rollout.error,
                "timestamp_version": self._rollout.timestamp_version},
            "refused_messages": dict(sorted(self.rejected_messages.items())),
        }

    def round_tallies(self) -> dict[int, dict[str, int]]:
        """Per round, the regional aggregators' tallies summed (``accepted``, ``duplicate``, ``rejected:<reason>``)."""
        out: dict[int, Counter[str]] = {}
        for url, log in self._round_logs.items():
            state = self._aggregators.get(url)
            if state is None or state.reading is None or state.reading.tier != "regional":
                continue
            for tally in log.tallies():
                cell = out.setdefault(tally.round, Counter())
                cell["accepted"] += tally.accepted
                cell["duplicate"] += tally.duplicate
                for reason, n in tally.rejected.items():
                    cell[f"rejected:{reason}"] += n
        return {round: dict(cell) for round, cell in sorted(out.items())}

    def _device_row(self, s: DeviceStatus, now: float) -> dict[str, Any]:
        return {
            "device": s.device, "region": s.region, "online": s.online, "failing": s.last_round_status in FAILING_OUTCOMES,
            "seen_s": max(0.0, now - s.timestamp_ms / 1000.0),
            "model": s.bundle_model, "version": s.bundle_version, "backend": s.backend, "agent": s.agent_version,
            "round": s.last_round, "round_status": s.last_round_status, "reason": s.last_round_reason,
            "loss": _finite(s.last_loss), "loss_text": None if s.last_loss is None else repr(s.last_loss),
            "accuracy": _finite(s.last_val_accuracy),
            "free_mb": None if s.free_memory_bytes is None else round(s.free_memory_bytes / 2**20, 1),
            "release": {"state": s.release.state.value, "version": s.release.version, "progress": s.release.progress,
                        "reason": s.release.reason},
        }

    def _regions(self, statuses: list[DeviceStatus], readings: list[AggregatorReading]) -> list[dict[str, Any]]:
        names = sorted({s.region for s in statuses} | {r.region for r in readings if r.tier == "regional"} | set(self._bridges))
        out = []
        latest = {region: points[-1] for region, points in self.history.regions().items() if points}
        for name in names:
            members = [s for s in statuses if s.region == name]
            agg = [r for r in readings if r.tier == "regional" and r.region == name]
            acc = latest.get(name)
            out.append({
                "region": name, "devices": len(members), "online": sum(1 for s in members if s.online),
                "round": max((r.round for r in agg if r.round is not None), default=None),
                "accepted": sum(r.round_accepted for r in agg) if agg else None,
                "aggregators": len(agg), "aggregators_connected": sum(1 for r in agg if r.connected),
                "pending_aggregate": any(r.aggregate_pending for r in agg),
                "bridge": None if name not in self._bridges else ("up" if self._bridges[name] else "down"),
                "accuracy": None if acc is None else acc.mean, "accuracy_round": None if acc is None else acc.round,
            })
        return out

    def _aggregator_row(self, state: AggregatorState) -> dict[str, Any]:
        r = state.reading
        if r is None:
            return {"url": state.url, "name": state.url, "up": False, "error": state.error}
        return {"url": state.url, "name": r.name, "up": True, "error": "", "tier": r.tier, "region": r.region,
                "connected": r.connected, "round": r.round, "collecting": r.collecting, "accepted": r.round_accepted,
                "samples": r.round_samples, "rounds_closed": r.rounds_closed, "pending_aggregate": r.aggregate_pending,
                "accepted_total": r.accepted_total, "rejected_total": r.rejected_total,
                "inbox_dropped": r.inbox_dropped_total, "service_dropped": r.service_dropped_total,
                "bundle_version": r.bundle_version}

    def _rounds(self) -> list[dict[str, Any]]:
        out = []
        for url, log in self._round_logs.items():
            state = self._aggregators[url]
            name = state.reading.name if state.reading is not None else url
            for tally in log.tallies()[-SNAPSHOT_ROUNDS:]:
                out.append({"aggregator": name, "round": tally.round, "accepted": tally.accepted,
                            "duplicate": tally.duplicate, "rejected": dict(sorted(tally.rejected.items()))})
        return sorted(out, key=lambda row: (-row["round"], row["aggregator"]))

    def _release(self, statuses: list[DeviceStatus]) -> dict[str, Any]:
        """Rollout progress from the devices' own release records (the controller's stage: ``rollout``)."""
        by_version: dict[int, Counter[str]] = {}
        for s in statuses:
            if s.release.version is not None:
                by_version.setdefault(s.release.version, Counter())[s.release.state.value] += 1
        releases = []
        for version, states in sorted(by_version.items(), reverse=True):
            taking = [s for s in statuses if s.release.version == version]
            releases.append({
                "version": version, "devices": len(taking), "states": dict(sorted(states.items())),
                "installed": states.get(ReleaseState.INSTALLED.value, 0),
                "running": sum(1 for s in statuses if s.bundle_version == version),
                "failed": states.get(ReleaseState.REFUSED.value, 0) + states.get(ReleaseState.ROLLED_BACK.value, 0),
            })
        return {"releases": releases, "fleet_devices": len(statuses)}

    def _problems(self, statuses: list[DeviceStatus]) -> list[str]:
        problems = []
        for state in sorted(self._aggregators.values(), key=_agg_order):
            if state.reading is None:
                problems.append(f"aggregator endpoint {state.url} unreachable: {state.error}")
            elif not state.reading.connected:
                problems.append(f"aggregator {state.reading.name} is not connected to its broker")
        for region, up in sorted(self._bridges.items()):
            if not up:
                problems.append(f"bridge of region {region} to the root is down")
        offline = sum(1 for s in statuses if not s.online)
        if offline:
            problems.append(f"{offline} device(s) offline")
        failing = sum(1 for s in statuses if s.last_round_status in FAILING_OUTCOMES)
        if failing:
            problems.append(f"{failing} device(s) whose last round was not accepted")
        if self._rollout is not None and self._rollout.error:
            problems.append(f"release metadata refused: {self._rollout.error}")
        if self.rejected_messages:
            problems.append(f"{sum(self.rejected_messages.values())} status or model message(s) refused (see below)")
        return problems


def _healthy(s: DeviceStatus) -> int:
    """Sort key: offline and failing devices first."""
    return 0 if not s.online else (1 if s.last_round_status in FAILING_OUTCOMES else 2)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _agg_order(state: AggregatorState) -> tuple[int, str]:
    r = state.reading
    return (0, "") if r is not None and r.tier == "root" else (1, r.name if r is not None else state.url)


def _version_order(item: tuple[tuple[str, int | None], int]) -> tuple[str, int]:
    (model, version), _ = item
    return model, -1 if version is None else version
