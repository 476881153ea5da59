"""The device's release memory across restarts: ``<state dir>/release/state.json`` (atomic writes).

``running_release``: the release that installed the running bundle (None: it
came from provisioning); ``previous_release``: the one it replaced (what a
way back returns to). ``failed``: releases the device went back from (its
own divergence or a signed withdrawal); ``refused``: releases refused, with
the reason (neither is tried again: release numbers only go up, so a fix is
a new release). ``trial``: set between installing a release and judging its
health, so a device that dies in between judges it after the restart instead
of trusting an unproven version. ``report``: the last release state shown in
the device's status.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from device_agent.errors import StateError
from device_agent.state_store import atomic_write_bytes

logger = logging.getLogger(__name__)

STATE_VERSION = 1
MAX_REMEMBERED = 256


@dataclass(frozen=True, kw_only=True)
class PendingTrial:
    """A release installed but not judged yet: the previous version's validation accuracy (None: not measured)
    and the bundle version it replaced."""

    release: int
    baseline_accuracy: float | None
    previous_version: int
    max_accuracy_drop_pct: int = 20


@dataclass(frozen=True, kw_only=True)
class ReleaseReport:
    """What the device says about releases in its status (``state``: idle, fetching, verifying, installing,
    installed, refused, rolled_back; ``release`` None: none named; ``progress`` percent; ``reason``).
    ``baseline_accuracy``: the previous version's validation accuracy measured before the switch."""

    state: str = "idle"
    release: int | None = None
    progress: int = 0
    reason: str = ""
    baseline_accuracy: float | None = None


@dataclass(frozen=True, kw_only=True)
class ReleaseMemory:
    """The persisted fields (module docstring)."""

    running_release: int | None = None
    previous_release: int | None = None
    failed: tuple[int, ...] = ()
    refused: dict[int, str] = field(default_factory=dict)
    trial: PendingTrial | None = None
    report: ReleaseReport = ReleaseReport()

    def with_refused(self, release: int, reason: str) -> ReleaseMemory:
        """This memory with ``release`` refused for ``reason`` (the oldest forgotten past a bound)."""
        refused = {**self.refused, release: reason}
        while len(refused) > MAX_REMEMBERED:
            del refused[min(refused)]
        return replace(self, refused=refused)

    def with_failed(self, release: int) -> ReleaseMemory:
        """This memory with ``release`` marked failed."""
        failed = tuple(sorted({*self.failed, release}))[-MAX_REMEMBERED:]
        return replace(self, failed=failed)


class ReleaseStateFile:
    """Reads and writes ``state.json`` in ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / "state.json"

    def load(self) -> ReleaseMemory:
        """The saved memory (a fresh one when none); StateError naming the file when damaged."""
        try:
            data: Any = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return ReleaseMemory()
        except (OSError, ValueError) as exc:
            raise StateError(f"{self.path} is unreadable: {exc}") from exc
        try:
            if data["version"] != STATE_VERSION:
                raise ValueError(f"unsupported version {data['version']!r}")
            trial = data["trial"]
            report = data["report"]
            return ReleaseMemory(
                running_release=_opt_int(data["running_release"]),
                previous_release=_opt_int(data["previous_release"]),
                failed=tuple(int(r) for r in data["failed"]),
                refused={int(k): str(v) for k, v in data["refused"].items()},
                trial=None if trial is None else PendingTrial(release=int(trial["release"]),
                                                              baseline_accuracy=_opt_float(trial["baseline_accuracy"]),
                                                              previous_version=int(trial["previous_version"]),
                                                              max_accuracy_drop_pct=int(trial["max_accuracy_drop_pct"])),
                report=ReleaseReport(state=str(report["state"]), release=_opt_int(report["release"]),
                                     progress=int(report["progress"]), reason=str(report["reason"]),
                                     baseline_accuracy=_opt_float(report["baseline_accuracy"])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"{self.path} is not release state: {exc!r}; it keeps failed releases out, so it is "
                             "not ignored: restore it or remove it on purpose") from exc

    def save(self, memory: ReleaseMemory) -> None:
        """Replace the file atomically."""
        trial = memory.trial
        report = memory.report
        data = {
            "version": STATE_VERSION,
            "running_release": memory.running_release,
            "previous_release": memory.previous_release,
            "failed": list(memory.failed),
            "refused": {str(k): v for k, v in sorted(memory.refused.items())},
            "trial": None if trial is None else {"release": trial.release, "baseline_accuracy": trial.baseline_accuracy,
                                                 "previous_version": trial.previous_version,
                                                 "max_accuracy_drop_pct": trial.max_accuracy_drop_pct},
            "report": {"state": report.state, "release": report.release, "progress": report.progress,
                       "reason": report.reason, "baseline_accuracy": report.baseline_accuracy},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, json.dumps(data, sort_keys=True).encode())


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer or null, got {value!r}")
    return value


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number or null, got {value!r}")
    return float(value)
