"""The rollout controller's word, as the dashboard shows it: the TUF metadata the root broker retains, verified.

The monitoring account reads ``release/metadata/#`` (retained, signed; the
bundle chunks stay out of reach). :class:`RolloutWatch` files what arrives in
the device's own :class:`~device_agent.release.metadata_cache.MetadataCache`
and, once new files have been quiet for ``settle_s``, runs the device's TUF
refresh (:func:`~device_agent.release.tuf_view.refresh_view`: thresholds,
expiry, rollback, mix-and-match) from the fleet's release root of trust. What
it returns is only what the trusted ``targets`` and delegated ``rollout`` roles
say: each release's version, stage (canary / promoted / halted / rolled back),
the controller's reason, its canaries and their share of the devices it
targets, and its expiry. A refusal is shown as such, with nothing from the
metadata (docs/operations.md, "Dashboard").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.release.metadata_cache import MetadataCache
from device_agent.release.tuf_view import BrokerFetcher, ReleaseRefusal, TrustedView, refresh_view

logger = logging.getLogger(__name__)

#: Releases a snapshot lists (newest first).
MAX_RELEASES = 5


@dataclass(frozen=True, kw_only=True)
class RolloutReading:
    """One verified refresh: the releases as plain rows (newest first), or why there are none (``error``).
    ``timestamp_version`` None with no error: no metadata verified yet (none on the broker so far)."""

    releases: tuple[dict[str, Any], ...] = ()
    error: str = ""
    timestamp_version: int | None = None


def rollout_rows(view: TrustedView, *, devices: Mapping[str, str], now_ms: int) -> tuple[dict[str, Any], ...]:
    """The trusted releases of ``view`` as rows, newest first; ``devices``: device -> region (the registries),
    to count whom a release targets (None when it targets groups, which only devices know)."""
    rows = []
    for info in sorted(view.releases, key=lambda r: r.release, reverse=True)[:MAX_RELEASES]:
        record = view.stage_of(info.release)
        targets = info.targets
        targeted = None if targets.groups else sum(
            1 for device, region in devices.items() if targets.matches(device=device, region=region))
        rows.append({
            "release": info.release, "model": info.model_name, "version": info.bundle_version,
            "stage": "unstaged" if record is None else record.stage.value,
            "reason": "" if record is None else record.reason,
            "decided_ms": None if record is None else record.decided_ms,
            "targets": targets.describe(), "canary": len(info.canary), "targeted": targeted,
            "canary_share": None if not targeted else round(len(info.canary) / targeted, 4),
            "expires_ms": info.expires_ms, "expired": info.expired(now_ms),
        })
    return tuple(rows)


class RolloutWatch:
    """Release metadata in, :class:`RolloutReading` out (module docstring). ``directory``: TUF's trusted
    metadata between refreshes (so a version going back is refused, as on a device)."""

    def __init__(self, *, root: bytes, directory: Path, prefix: str, settle_s: float = 0.3, recheck_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self._root = root
        self._directory = directory
        self._prefix = prefix
        self._settle_s = settle_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._cache = MetadataCache()
        self._recheck_s = recheck_s
        self._dirty = False
        self._last = clock()
        self._refreshed: float | None = None

    def handles(self, topic: str) -> bool:
        """True for a release metadata topic."""
        return topic.startswith(self._prefix)

    def file(self, topic: str, payload: bytes) -> None:
        """File one retained metadata message (refused names and sizes are logged by the cache)."""
        if self._cache.file(topic[len(self._prefix):], payload):
            self._dirty = True
            self._last = self._clock()

    def due(self) -> bool:
        """True when new metadata arrived and has been quiet for ``settle_s``, or ``recheck_s`` after the last
        refresh (metadata and releases expire without any new message)."""
        now = self._clock()
        return (self._dirty and now - self._last >= self._settle_s) or (
            self._refreshed is not None and now - self._refreshed >= self._recheck_s)

    def refresh(self, devices: Mapping[str, str]) -> RolloutReading:
        """One TUF refresh over what the broker holds (blocking: a few milliseconds of signature checks)."""
        self._dirty = False
        self._refreshed = self._last = self._clock()
        fetcher = BrokerFetcher(metadata=self._cache.get, target=lambda sha256: None)
        try:
            view = refresh_view(self._directory, bootstrap_root=self._root, fetcher=fetcher)
        except ReleaseRefusal as exc:
            if exc.transient:
                self._dirty = True  # a file is not on the broker yet: try again once more arrives or settles
            logger.info("dashboard: release metadata refused: %s", exc)
            return RolloutReading(error=exc.reason)
        return RolloutReading(releases=rollout_rows(view, devices=devices, now_ms=int(self._wall_clock() * 1000)),
                              timestamp_version=view.timestamp_version)
