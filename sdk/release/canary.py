"""The canary policy: promote a release when its canaries are healthy on it, halt it when they are not (pure).

A canary is *healthy* when its verified status says it runs the release's
bundle version, its release state is ``installed`` for that release, it
trained (a last loss is known) and the health rule holds
(:func:`~device_agent.release.policy.judge_trial`: finite loss, validation
accuracy at most ``max_accuracy_drop_pct`` points below the previous
version's, which the device measured on the same data before switching).
It is *unhealthy* when it rolled back from the release or refused it, or its
numbers break the rule; otherwise it is *waiting* (offline, still fetching,
not reported yet).

:func:`judge_canaries` promotes once at least ``min_healthy`` of the
canaries are healthy and none is unhealthy, halts at the first unhealthy
canary, and halts a release still waiting after ``timeout_s`` (a canary that
never reports is not a success). Halting is what rolls the canaries back:
devices running a halted release return to the version they kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from device_agent.protocol.status import DeviceStatus, ReleaseState
from device_agent.release.policy import judge_trial
from device_agent.release.release_info import ReleaseInfo


class CanaryAction(str, Enum):
    """What the controller does with a canary release."""

    WAIT = "wait"
    PROMOTE = "promote"
    HALT = "halt"


@dataclass(frozen=True, kw_only=True)
class CanaryPolicy:
    """``min_healthy``: share of the canaries that must be healthy (1.0: all); ``timeout_s``: halt a release
    whose canaries have not all reported healthy by then; ``max_accuracy_drop_pct`` None: the release's own."""

    min_healthy: float = 1.0
    timeout_s: float = 1800.0
    max_accuracy_drop_pct: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.min_healthy <= 1:
            raise ValueError(f"min_healthy must be in (0, 1], got {self.min_healthy}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_accuracy_drop_pct is not None and not 0 <= self.max_accuracy_drop_pct <= 100:
            raise ValueError(f"max_accuracy_drop_pct must be in 0..100, got {self.max_accuracy_drop_pct}")


@dataclass(frozen=True, kw_only=True)
class CanaryReport:
    """One canary's state (``waiting``, ``healthy``, ``unhealthy``) and why."""

    device: str
    state: str
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class CanaryVerdict:
    """The decision on one release and each canary's report."""

    action: CanaryAction
    reason: str
    canaries: tuple[CanaryReport, ...]


def canary_health(info: ReleaseInfo, status: DeviceStatus | None, *, max_accuracy_drop_pct: int) -> CanaryReport:
    """One canary's :class:`CanaryReport` from its verified status (None: nothing verified from it)."""
    if status is None:
        return CanaryReport(device="?", state="waiting", detail="no verified status")
    device = status.device
    release = status.release
    if release.version == info.release and release.state in (ReleaseState.ROLLED_BACK, ReleaseState.REFUSED):
        return CanaryReport(device=device, state="unhealthy", detail=f"{release.state.value}: {release.reason}")
    if release.version != info.release or release.state is not ReleaseState.INSTALLED \
            or status.bundle_version != info.bundle_version:
        where = f"{release.state.value}" + ("" if release.version is None else f" release {release.version}")
        return CanaryReport(device=device, state="waiting", detail=f"{where}, bundle v{status.bundle_version}")
    health = judge_trial(1 if status.last_loss is not None else 0, status.last_loss, status.last_val_accuracy,
                         release.baseline_accuracy, max_accuracy_drop_pct=max_accuracy_drop_pct)
    if not health.healthy:
        return CanaryReport(device=device, state="unhealthy", detail=health.reason)
    return CanaryReport(device=device, state="healthy",
                        detail=f"loss {status.last_loss:.4f}, accuracy {_fmt(status.last_val_accuracy)} "
                               f"vs {_fmt(release.baseline_accuracy)}")


def judge_canaries(info: ReleaseInfo, statuses: Mapping[str, DeviceStatus | None], *, staged_ms: int, now_ms: int,
                   policy: CanaryPolicy = CanaryPolicy()) -> CanaryVerdict:
    """The verdict on canary release ``info`` (staged at ``staged_ms``) from its canaries' verified ``statuses``."""
    drop = info.max_accuracy_drop_pct if policy.max_accuracy_drop_pct is None else policy.max_accuracy_drop_pct
    reports = []
    for device in info.canary:
        report = canary_health(info, statuses.get(device), max_accuracy_drop_pct=drop)
        reports.append(CanaryReport(device=device, state=report.state, detail=report.detail))
    canaries = tuple(reports)
    if not canaries:
        return CanaryVerdict(action=CanaryAction.PROMOTE, reason="no canary devices", canaries=canaries)
    bad = [r for r in canaries if r.state == "unhealthy"]
    if bad:
        return CanaryVerdict(action=CanaryAction.HALT, canaries=canaries,
                             reason="; ".join(f"{r.device}: {r.detail}" for r in bad)[:200])
    healthy = sum(r.state == "healthy" for r in canaries)
    need = math.ceil(policy.min_healthy * len(canaries) - 1e-9)
    if healthy >= need:
        return CanaryVerdict(action=CanaryAction.PROMOTE, canaries=canaries,
                             reason=f"{healthy}/{len(canaries)} canaries healthy")
    waited = (now_ms - staged_ms) / 1000
    if waited >= policy.timeout_s:
        return CanaryVerdict(action=CanaryAction.HALT, canaries=canaries,
                             reason=f"timeout: {healthy}/{len(canaries)} canaries healthy after {waited:.0f} s")
    return CanaryVerdict(action=CanaryAction.WAIT, canaries=canaries,
                         reason=f"{healthy}/{len(canaries)} healthy, {need} needed")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
