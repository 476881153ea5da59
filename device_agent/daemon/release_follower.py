"""The agent's side of releases: release messages, the version switch between rounds, the status record.

:class:`ReleaseFollower` gives the release topics' messages to the
:class:`ReleaseClient`, shows its reports in the device status, and steps
the :class:`VersionSwitch` between rounds (never mid-round). Adopting a
switched trainer resets the agent's round state, so that stays with the agent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from device_agent.daemon.connection import InboundMessage
from device_agent.daemon.version_switch import Switched, VersionSwitch
from device_agent.protocol.status import ReleaseState, ReleaseStatus, short_text
from device_agent.release.release_state import ReleaseReport
from device_agent.trainer import DeviceTrainer

if TYPE_CHECKING:  # python-tuf loads with the release client, only when [release] is configured
    from device_agent.release.client import ReleaseClient

logger = logging.getLogger(__name__)


def release_status(report: ReleaseReport) -> ReleaseStatus:
    """The status's release sub-record for the release client's ``report``."""
    return ReleaseStatus(state=ReleaseState(report.state), version=report.release, progress=report.progress,
                         reason=short_text(report.reason), baseline_accuracy=report.baseline_accuracy)


class ReleaseFollower:
    """Follows releases for one agent; ``release`` None: releases are not followed (nor is ``switch`` stepped).

    ``update_status`` publishes changed status fields; the last run's report is
    shown at once, until something changes.
    """

    def __init__(
        self,
        *,
        release: ReleaseClient | None,
        switch: VersionSwitch | None,
        update_status: Callable[..., object],
    ) -> None:
        self.release = release
        self._switch = switch
        self._update_status = update_status
        self._told_foreign: int | None = None
        if release is not None:
            release.on_report = self.show
            self.show(release.memory.report)

    def show(self, report: ReleaseReport) -> None:
        """Show the release client's report in the device status (the release sub-record)."""
        self._update_status(release=release_status(report))

    def take(self, message: InboundMessage) -> bool:
        """Give a release topic's message to the release client (True: it was one)."""
        if self.release is None or not self.release.handles(message.topic):
            return False
        self.release.handle(message)
        return True

    def step(self, trainer: DeviceTrainer, *, foreign_version: int | None, bundle_version: int) -> Switched | None:
        """The version switch's step for ``trainer``; the switch made, None when nothing changed or no switch.

        When nothing changed, says once per version that the region's models
        are for another bundle version (``foreign_version``) than ``bundle_version``.
        """
        if self._switch is None:
            return None
        switched = self._switch.step(trainer)
        foreign = foreign_version
        if switched is None and foreign is not None and foreign != self._told_foreign:
            self._told_foreign = foreign
            logger.warning("the region's models are for bundle v%d, this device runs v%d: it sits out the rounds "
                           "until both run one version (a canary until its release is promoted; otherwise the "
                           "release its status names, or why it refused it)", foreign, bundle_version)
        return switched
