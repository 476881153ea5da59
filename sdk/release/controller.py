"""The release controller: watches canary releases, promotes or halts them, keeps the online metadata fresh.

One step (:meth:`ReleaseController.step`):

1. read every device's verified status (the root broker holds them all);
2. for each release in stage ``canary``: :func:`~sdk.release.canary.judge_canaries`
   decides; ``promote`` or ``halt`` becomes a new stage record signed by the
   ``rollout`` role;
3. re-sign the online roles (timestamp, snapshot, rollout) that are within
   half their validity of expiring, so devices never see the fleet's own
   metadata expire while the controller runs;
4. publish when anything changed.

Why a service of its own and not part of the root aggregator: it signs with
the release roles' online keys, which the aggregator has no business
holding (a compromised aggregator must not be able to promote a release,
nor the controller to forge a model); it can run where the operator's keys
are; and ``--once`` runs one step from cron. It holds no state of its own:
the repository and the statuses are the state, so a restart loses nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from device_agent.protocol.status import DeviceStatus
from device_agent.release.release_info import Stage, StageRecord
from sdk.release.canary import CanaryAction, CanaryPolicy, CanaryVerdict, judge_canaries
from sdk.release.repository import ReleaseRepository, Signers

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ControllerStep:
    """What one step saw and did: the verdict per canary release, the roles re-signed, whether it published."""

    verdicts: Mapping[int, CanaryVerdict]
    refreshed: tuple[str, ...]
    published: bool


class ReleaseController:
    """Promotes or halts canary releases (module docstring).

    ``repository`` opens the repository afresh each step (the operator may
    publish meanwhile); ``statuses`` gives the verified statuses by device;
    ``publish`` puts the repository on the broker; ``signers`` hold the online
    roles (rollout, snapshot, timestamp). ``wall_clock``: Unix seconds.
    """

    def __init__(self, *, repository: Callable[[], ReleaseRepository], statuses: Callable[[], Mapping[str, DeviceStatus | None]],
                 publish: Callable[[ReleaseRepository], None], signers: Signers, policy: CanaryPolicy = CanaryPolicy(),
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._repository = repository
        self._statuses = statuses
        self._publish = publish
        self._signers = signers
        self.policy = policy
        self._wall_clock = wall_clock

    def step(self) -> ControllerStep:
        """One pass (module docstring)."""
        repo = self._repository()
        canaries = [e for e in repo.releases() if e.stage is not None and e.stage.stage is Stage.CANARY]
        verdicts: dict[int, CanaryVerdict] = {}
        changed = False
        if canaries:
            statuses = self._statuses()
            now_ms = int(self._wall_clock() * 1000)
            for entry in canaries:
                assert entry.stage is not None
                verdict = judge_canaries(entry.info, statuses, staged_ms=entry.stage.decided_ms, now_ms=now_ms,
                                         policy=self.policy)
                verdicts[entry.info.release] = verdict
                if verdict.action is CanaryAction.WAIT:
                    logger.info("release %d: waiting (%s)", entry.info.release, verdict.reason)
                    continue
                stage = Stage.PROMOTED if verdict.action is CanaryAction.PROMOTE else Stage.HALTED
                repo.set_stage(StageRecord(release=entry.info.release, stage=stage, reason=verdict.reason[:200],
                                           decided_ms=now_ms), self._signers)
                (logger.warning if stage is Stage.HALTED else logger.info)(
                    "release %d %s: %s", entry.info.release, stage.value, verdict.reason)
                changed = True
        refreshed = tuple(repo.refresh_online(self._signers))
        if refreshed:
            logger.info("re-signed %s before they expire", ", ".join(refreshed))
        if changed or refreshed:
            self._publish(repo)
        return ControllerStep(verdicts=verdicts, refreshed=refreshed, published=changed or bool(refreshed))

    def run(self, stop: threading.Event, *, interval_s: float = 5.0, max_seconds: float | None = None) -> int:
        """Step every ``interval_s`` until ``stop`` is set (or ``max_seconds`` pass); the steps made.

        A step that fails (broker away) is logged and tried again next time.
        """
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        steps = 0
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the controller outlives one bad step (a broker restart, a network error)
                logger.exception("release controller step failed; trying again in %.1f s", interval_s)
            steps += 1
            stop.wait(interval_s if deadline is None else max(0.0, min(interval_s, deadline - time.monotonic())))
        return steps
