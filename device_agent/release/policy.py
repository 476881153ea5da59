"""What a device does about the releases it trusts, and whether a new version is healthy on it (pure).

:func:`decide` looks at the trusted releases and their stages, the device's
identity and what it runs, and answers one :class:`Decision`:

1. The release the device runs was withdrawn by signed metadata (``halted``,
   ``rolled_back``) or marked failed by the device itself: **revert** to the
   version kept from before.
2. Otherwise the newest release for this device (fleet, targets, and stage
   ``promoted``, or ``canary`` with the device among the canaries) that is
   newer than the one it runs and was neither failed nor refused before:
   **fetch** it, or **refuse** it when it has expired or its bundle is older
   than the highest installed (a downgrade: refused before any download).
3. Else nothing.

:func:`judge_trial` is the health rule for one device on a new version:
it trained, its loss is finite, and its validation accuracy is not more than
``max_accuracy_drop_pct`` points below the previous version's on the same
data. The release controller applies the same rule to the statuses it reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from device_agent.bundle.install_policy import BundleDowngradeError, InstalledRecord, check_offer
from device_agent.release.release_info import ReleaseInfo, Stage, StageRecord


class Action(str, Enum):
    """What :func:`decide` asks for."""

    NONE = "none"
    FETCH = "fetch"
    REVERT = "revert"
    REFUSE = "refuse"


@dataclass(frozen=True, kw_only=True)
class DeviceIdentity:
    """Who the device is, for release targeting."""

    device: str
    fleet: str
    region: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LocalRelease:
    """What the device runs and remembers.

    ``running_release`` None: the bundle came from provisioning, not a release.
    ``highest``: the record of the highest bundle ever installed (the
    anti-rollback floor; None on a fresh device). ``failed``: releases the
    device went back from; ``refused``: releases it refused (neither is tried again).
    """

    bundle_version: int
    running_release: int | None = None
    highest: InstalledRecord | None = None
    failed: frozenset[int] = frozenset()
    refused: frozenset[int] = frozenset()


@dataclass(frozen=True, kw_only=True)
class Decision:
    """One answer of :func:`decide`: ``reason`` is a short code (``halted``, ``downgrade``...), ``detail`` a sentence."""

    action: Action
    release: ReleaseInfo | None = None
    reason: str = ""
    detail: str = ""


NOTHING = Decision(action=Action.NONE)
#: The shape of :func:`decide` (the aggregators plug in their own rule).
DecideFn = Callable[..., Decision]


def decide(releases: tuple[ReleaseInfo, ...], stages: Mapping[int, StageRecord], *, identity: DeviceIdentity,
           local: LocalRelease, now_ms: int) -> Decision:
    """The one thing to do now (module docstring)."""
    running = local.running_release
    if running is not None:
        record = stages.get(running)
        info = next((r for r in releases if r.release == running), None)
        if running in local.failed:
            return Decision(action=Action.REVERT, release=info, reason="failed",
                            detail=f"release {running} was marked failed on this device")
        if record is not None and record.stage.withdrawn:
            return Decision(action=Action.REVERT, release=info, reason=record.stage.value,
                            detail=f"release {running} was {record.stage.value.replace('_', ' ')}: {record.reason}")
    candidates = [r for r in releases if _offered(r, stages.get(r.release), identity)
                  and r.release > (running or 0) and r.release not in local.failed and r.release not in local.refused]
    if not candidates:
        return NOTHING
    best = max(candidates, key=lambda r: r.release)
    if best.expired(now_ms):
        return Decision(action=Action.REFUSE, release=best, reason="release_expired",
                        detail=f"release {best.release} expired before this device installed it")
    try:  # the install policy's one rule, before anything is fetched
        check_offer(local.highest, model_name=best.model_name, bundle_version=best.bundle_version)
    except BundleDowngradeError as exc:
        return Decision(action=Action.REFUSE, release=best, reason="downgrade",
                        detail=f"release {best.release} carries bundle v{best.bundle_version}: {exc}")
    return Decision(action=Action.FETCH, release=best)


def _offered(info: ReleaseInfo, stage: StageRecord | None, identity: DeviceIdentity) -> bool:
    if info.fleet != identity.fleet or stage is None:
        return False
    if not info.targets.matches(device=identity.device, region=identity.region, groups=identity.groups):
        return False
    return stage.stage is Stage.PROMOTED or (stage.stage is Stage.CANARY and info.is_canary(identity.device))


@dataclass(frozen=True, kw_only=True)
class Health:
    """The verdict on a :class:`TrialResult`: ``healthy``, and the reason when not."""

    healthy: bool
    reason: str = ""


def judge_trial(steps: int, loss: float | None, accuracy: float | None, baseline_accuracy: float | None, *,
                max_accuracy_drop_pct: int) -> Health:
    """Healthy when it trained (``steps`` > 0), ``loss`` is finite, and ``accuracy`` is at most
    ``max_accuracy_drop_pct`` points below ``baseline_accuracy`` (either None: that check is skipped)."""
    if steps <= 0:
        return Health(healthy=False, reason="did not train")
    if loss is None or not math.isfinite(loss):
        return Health(healthy=False, reason=f"training loss is not finite ({loss})")
    if accuracy is not None and not math.isfinite(accuracy):
        return Health(healthy=False, reason=f"validation accuracy is not finite ({accuracy})")
    if accuracy is not None and baseline_accuracy is not None:
        drop = baseline_accuracy - accuracy
        if drop * 100 > max_accuracy_drop_pct + 1e-9:  # 0.9 - 0.7 is 0.20000000000000007
            return Health(healthy=False, reason=f"validation accuracy {accuracy:.3f} is {drop:.3f} below the previous "
                                                f"version's {baseline_accuracy:.3f} (at most {max_accuracy_drop_pct / 100:.2f})")
    return Health(healthy=True)
