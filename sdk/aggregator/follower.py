"""How an aggregator service follows the fleet's releases: which bundle version the federation runs, and fetching it.

The federation runs the bundle of the *promoted* release with the highest
bundle version that targets the whole fleet (no region, group or device
restriction; a regional aggregator also follows one restricted to its
region); a halted or rolled back release is skipped, and with none left it
runs the configured bundle.
Canary releases never move an aggregator: canary devices try the new
version locally while the federation stays on the old one.

:class:`VersionFollower` reuses the device's release client (same TUF
checks, same chunked, verified download over MQTT) with this rule in place
of the device's, and puts each fetched bundle into the service's
:class:`~sdk.aggregator.bundles.BundleLibrary`. The services switch at a
round boundary (:mod:`sdk.aggregator.root_service`, :mod:`sdk.aggregator.regional_service`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from device_agent.daemon.connection_types import InboundMessage
from device_agent.keys import TrustedKeys
from device_agent.protocol.topics import TopicLayout
from device_agent.release.client import InstallReady, ReleaseClient
from device_agent.release.policy import NOTHING, Action, Decision, DeviceIdentity, LocalRelease
from device_agent.release.release_info import ReleaseInfo, SharedStart, Stage, StageRecord
from device_agent.release.settings import ReleaseSettings
from sdk.aggregator.bundles import BundleLibrary

logger = logging.getLogger(__name__)


def federation_release(releases: Sequence[ReleaseInfo], stages: Mapping[int, StageRecord], *, fleet: str,
                       region: str | None) -> ReleaseInfo | None:
    """The release the federation runs (module docstring): of the promoted fleet-wide releases, the one with the
    highest bundle version (the newest release among equals). An older bundle promoted again is not a way back:
    devices refuse it as a downgrade, and so do the aggregators; ``fedge release rollback`` is. None: the
    configured bundle."""
    candidates = []
    for info in releases:
        stage = stages.get(info.release)
        targets = info.targets
        fleet_wide = not targets.groups and not targets.devices and (
            not targets.regions or (region is not None and region in targets.regions))
        if info.fleet == fleet and stage is not None and stage.stage is Stage.PROMOTED and fleet_wide:
            candidates.append(info)
    return max(candidates, key=lambda r: (r.bundle_version, r.release), default=None)


class VersionFollower:
    """Follows releases for one aggregator service (module docstring). ``region`` None: the root."""

    def __init__(self, settings: ReleaseSettings, *, fleet: str, identity: str, region: str | None, directory: Path,
                 layout: TopicLayout, library: BundleLibrary, fleet_keys: TrustedKeys, configured_version: int | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.library = library
        self._fleet = fleet
        self._region = region
        self._configured = configured_version
        self._wanted: int | None = None
        self._subscribe: Callable[[Sequence[str]], None] | None = None
        self._unsubscribe: Callable[[Sequence[str]], None] | None = None
        self.client = ReleaseClient(settings, identity=DeviceIdentity(device=identity, fleet=fleet, region=region or "root"),
                                    directory=directory, topics=layout, fleet_keys=fleet_keys,
                                    subscribe=lambda topics: self._call(self._subscribe, topics),
                                    unsubscribe=lambda topics: self._call(self._unsubscribe, topics),
                                    clock=clock, decide=self._decide)

    def attach(self, subscribe: Callable[[Sequence[str]], None], unsubscribe: Callable[[Sequence[str]], None]) -> None:
        """Use the service's connection to (un)subscribe chunk topics (the service calls this)."""
        self._subscribe, self._unsubscribe = subscribe, unsubscribe

    @staticmethod
    def _call(target: Callable[[Sequence[str]], None] | None, topics: Sequence[str]) -> None:
        if target is None:
            raise RuntimeError("the follower is not attached to a connection")
        target(topics)

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """The release metadata filter (subscribed on every connect)."""
        return self.client.subscriptions

    def handles(self, topic: str) -> bool:
        """True for a release topic."""
        return self.client.handles(topic)

    def handle(self, topic: str, payload: bytes) -> None:
        """File one release message."""
        self.client.handle(InboundMessage(topic=topic, payload=payload, retained=False))

    def release(self) -> ReleaseInfo | None:
        """The release the federation should run now (None: the configured bundle, or no trusted metadata yet)."""
        view = self.client.view
        if view is None:
            return None
        return federation_release(view.releases, view.stages, fleet=self._fleet, region=self._region)

    def desired_version(self) -> int | None:
        """The bundle version the federation should run now; None while no trusted metadata is at hand
        (not fetched yet, or refused: expired metadata moves nothing)."""
        if self.client.view is None:
            return None
        release = self.release()
        return self._configured if release is None else release.bundle_version

    def shared_start(self, version: int) -> SharedStart:
        """How the release of bundle ``version`` starts its shared layers (``carry`` when no release names it)."""
        view = self.client.view
        found = [r for r in (view.releases if view is not None else ()) if r.bundle_version == version]
        return found[-1].shared_start if found else SharedStart.CARRY

    def want(self, version: int) -> None:
        """Fetch bundle ``version`` too (a region asked for it by the root's model) if a trusted release carries it."""
        self._wanted = version

    def step(self) -> None:
        """Refresh, fetch, verify; a verified bundle goes into the library."""
        ready = self.client.step(LocalRelease(bundle_version=self._configured or 0))
        if isinstance(ready, InstallReady):
            entry = self.library.add(ready.archive)
            self.client.installed(ready.info)
            logger.info("release %d: bundle v%d is in the library", ready.info.release, entry.manifest.bundle_version)

    def _decide(self, releases: tuple[ReleaseInfo, ...], stages: Mapping[int, StageRecord], *, identity: DeviceIdentity,
                local: LocalRelease, now_ms: int) -> Decision:
        wanted = federation_release(releases, stages, fleet=self._fleet, region=self._region)
        if self._wanted is not None and self.library.get(self._wanted) is None:
            carrying = [r for r in releases if r.bundle_version == self._wanted and r.release not in local.refused]
            if carrying:
                wanted = carrying[-1]
        if wanted is None or self.library.get(wanted.bundle_version) is not None or wanted.release in local.refused:
            return NOTHING
        return Decision(action=Action.FETCH, release=wanted)
