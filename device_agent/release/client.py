"""The device's release client: broker messages in, a verified bundle (or a way back) out, between rounds.

The agent feeds it every message on ``release/...`` (:meth:`ReleaseClient.handle`:
retained metadata files into a bounded cache, bundle chunks into the
:class:`~device_agent.release.download_store.DownloadStore` after their signed
SHA-256 matched) and calls :meth:`ReleaseClient.step` between rounds. A step:

1. refreshes TUF once the metadata changed and settled (or periodically);
   a refusal (expired, rollback, untrusted...) is reported and nothing is
   acted on until valid metadata comes;
2. asks :func:`~device_agent.release.policy.decide` what to do;
3. fetches: subscribes to the missing chunks one topic each, at most
   ``window`` at a time and ``chunks_per_s`` per second (a bandwidth cap that
   also keeps training going), resubscribing after ``chunk_timeout_s``;
   a restarted device resumes from the chunks on disk;
4. once complete, lets TUF check the whole file (length, SHA-256) and checks
   the bundle's own signature, then returns :class:`InstallReady`; or
   returns :class:`RevertNeeded`. The agent installs (never mid-round).

Everything the device decides is reported through ``report`` (its status).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from device_agent.bundle.archive import verify_bundle
from device_agent.daemon.connection_types import InboundMessage
from device_agent.errors import BundleError
from device_agent.keys import TrustedKeys
from device_agent.protocol.topics import TopicLayout
from device_agent.release.download_store import Download, DownloadStore
from device_agent.release.policy import Action, Decision, DecideFn, DeviceIdentity, LocalRelease, decide
from device_agent.release.release_info import ReleaseInfo
from device_agent.release.release_state import ReleaseMemory, ReleaseReport, ReleaseStateFile
from device_agent.release.settings import ReleaseSettings
from device_agent.release.metadata_cache import MetadataCache
from device_agent.release.tuf_view import BrokerFetcher, ReleaseRefusal, TrustedView, refresh_view

logger = logging.getLogger(__name__)

_RETRY_MAX_S = 30.0


@dataclass(frozen=True, kw_only=True)
class InstallReady:
    """A release whose bundle passed TUF and its own signature: install it at the round boundary."""

    info: ReleaseInfo
    archive: Path


@dataclass(frozen=True, kw_only=True)
class RevertNeeded:
    """The running release must be left for the kept version (``decision.reason``: failed, halted, rolled_back)."""

    decision: Decision


class ReleaseClient:
    """Release handling for one device (module docstring). ``directory``: ``<state dir>/release``.

    ``decide``: what to do about the trusted releases (default: a device's rule,
    :func:`~device_agent.release.policy.decide`; the aggregators follow the fleet's version with their own).
    """

    def __init__(self, settings: ReleaseSettings, *, identity: DeviceIdentity, directory: Path, topics: TopicLayout,
                 fleet_keys: TrustedKeys, subscribe: Callable[[Sequence[str]], None],
                 unsubscribe: Callable[[Sequence[str]], None], report: Callable[[ReleaseReport], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 decide: DecideFn = decide) -> None:
        self.settings = settings
        self.identity = identity
        self.directory = directory
        self._topics = topics
        self._fleet_keys = fleet_keys
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        #: Called with every new :class:`ReleaseReport` (the agent publishes it in the device status).
        self.on_report = report
        self._clock = clock
        self._wall_clock = wall_clock
        self._decide = decide
        try:
            self._root = settings.root_file.read_bytes()
        except OSError as exc:
            raise BundleError(f"release.root_file: cannot read {settings.root_file}: {exc.strerror or exc}") from exc
        self._state = ReleaseStateFile(directory)
        self.memory = self._state.load()
        self._store = DownloadStore(directory / "downloads")
        self._metadata = MetadataCache()
        self._dirty = True
        self._last_metadata = clock()
        self._next_refresh = clock()
        self._retry_s = 1.0
        self.view: TrustedView | None = None
        self._download: Download | None = None
        self._in_flight: dict[int, float] = {}
        #: Chunks that came back wrong: index -> (not before, failures), asked again with a growing delay.
        self._bad: dict[int, tuple[float, int]] = {}
        self._tokens = float(settings.window)
        self._tokens_at = clock()
        self._metadata_prefix = topics.release_metadata("")
        self._chunk_prefix = topics.release_chunk_prefix()

    # -- messages (the agent's thread) ------------------------------------------------------

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """What the connection subscribes to on every connect: the retained metadata files."""
        return (self._topics.release_metadata_filter,)

    def handles(self, topic: str) -> bool:
        """True for a release topic (metadata or chunk)."""
        return topic.startswith(self._metadata_prefix) or topic.startswith(self._chunk_prefix)

    def handle(self, message: InboundMessage) -> None:
        """File one release message: a metadata file into the cache, a chunk into the download."""
        topic = message.topic
        if topic.startswith(self._metadata_prefix):
            self._on_metadata(topic[len(self._metadata_prefix):], message.payload)
        elif topic.startswith(self._chunk_prefix):
            self._on_chunk(topic[len(self._chunk_prefix):], message.payload)

    def _on_metadata(self, name: str, payload: bytes) -> None:
        if self._metadata.file(name, payload):
            self._dirty = True
            self._last_metadata = self._clock()
            # New files end an incomplete-metadata backoff: its delays are for files that do not come (a fleet
            # whose repository was never published), not for a release arriving now (refresh once it settles).
            self._next_refresh = min(self._next_refresh, self._last_metadata)

    def _on_chunk(self, rest: str, payload: bytes) -> None:
        sha, _, index_text = rest.partition("/")
        download = self._download
        if download is None or sha != download.info.sha256 or not index_text.isdigit():
            return  # a chunk of a download this device is not doing (or a stale subscription)
        index = int(index_text)
        result = download.add(index, payload)
        if index in self._in_flight:
            del self._in_flight[index]
            self._unsubscribe([self._topics.release_chunk(sha, index)])
        if result.reason == "hash_mismatch":
            failures = self._bad.get(index, (0.0, 0))[1] + 1
            delay = min(_RETRY_MAX_S * 10, self.settings.chunk_timeout_s * 2 ** (failures - 1))
            self._bad[index] = (self._clock() + delay, failures)
            (logger.error if failures == 1 else logger.info)(
                "release %d: chunk %d does not match its signed SHA-256 (tampered or damaged, %d time(s)); "
                "asking again in %.0f s", download.info.release, index, failures, delay)
            self._set_report(state="refused", release=download.info.release, progress=download.progress_pct,
                             reason=f"hash_mismatch: chunk {index} does not match the signed metadata")
        elif result.stored:
            self._bad.pop(index, None)
            # A refusal (a chunk that came back wrong) stays in the status until that chunk arrives right.
            if not self._bad and (download.received == download.info.chunks or download.received % 8 == 0
                                  or self.memory.report.state == "refused"):
                self._set_report(state="fetching", release=download.info.release, progress=download.progress_pct,
                                 reason="")

    # -- the step between rounds --------------------------------------------------------------

    def step(self, local: LocalRelease) -> InstallReady | RevertNeeded | None:
        """Refresh when due, decide, fetch, verify (module docstring); what the agent must do now, if anything."""
        now = self._clock()
        if (self._dirty and now - self._last_metadata >= self.settings.settle_s and now >= self._next_refresh) \
                or now - self._next_refresh >= self.settings.recheck_s:
            self._refresh(now)
        if self.view is None:
            return None
        local = replace(local, failed=frozenset(self.memory.failed) | local.failed,
                        refused=frozenset(self.memory.refused) | local.refused)
        decision = self._decide(self.view.releases, self.view.stages, identity=self.identity, local=local,
                                now_ms=int(self._wall_clock() * 1000))
        if decision.action is Action.REVERT:
            return RevertNeeded(decision=decision)
        if decision.action is Action.REFUSE and decision.release is not None:
            self.refuse(decision.release.release, f"{decision.reason}: {decision.detail}")
            return None
        if decision.action is Action.FETCH and decision.release is not None:
            return self._fetch(decision.release, now)
        self._stop_download()
        return None

    def _refresh(self, now: float) -> None:
        self._dirty = False
        fetcher = BrokerFetcher(metadata=self._metadata.get, target=self._target_bytes)
        try:
            self.view = refresh_view(self.directory / "metadata", bootstrap_root=self._root, fetcher=fetcher)
        except ReleaseRefusal as exc:
            self.view = None
            if exc.transient:
                self._dirty = True  # something is not on the broker yet: try again soon
                self._next_refresh = now + self._retry_s
                logger.info("release metadata incomplete (%s); retrying in %.1f s, or once more arrives",
                            exc.detail, self._retry_s)
                self._retry_s = min(_RETRY_MAX_S, self._retry_s * 2)
                return
            logger.error("release metadata refused: %s", exc)
            self._set_report(state="refused", release=None, progress=0, reason=f"{exc.reason}: {exc.detail}")
        else:
            self._retry_s = 1.0
            if self.memory.report.state == "refused" and self.memory.report.release is None:
                self._set_report(state="idle", release=None, progress=0, reason="")
        self._next_refresh = now

    def _fetch(self, info: ReleaseInfo, now: float) -> InstallReady | None:
        if self._download is None or self._download.info != info:
            self._stop_download()
            self._download = self._store.begin(info)
            logger.info("release %d (bundle v%d): fetching %d chunk(s), %d on disk already", info.release,
                        info.bundle_version, info.chunks, self._download.received)
            self._set_report(state="fetching", release=info.release, progress=self._download.progress_pct, reason="")
        download = self._download
        if not download.complete:
            self._request_chunks(download, now)
            return None
        return self._verify(download)

    def _request_chunks(self, download: Download, now: float) -> None:
        settings = self.settings
        self._tokens = min(float(settings.window), self._tokens + (now - self._tokens_at) * settings.chunks_per_s)
        self._tokens_at = now
        sha = download.info.sha256
        for index, since in list(self._in_flight.items()):
            if now - since >= settings.chunk_timeout_s:  # no answer: ask again (the broker resends retained messages)
                del self._in_flight[index]
                self._unsubscribe([self._topics.release_chunk(sha, index)])
        wanted: list[int] = []
        for index in download.missing():
            if len(self._in_flight) + len(wanted) >= settings.window or self._tokens < 1:
                break
            if index not in self._in_flight and self._bad.get(index, (0.0, 0))[0] <= now:
                wanted.append(index)
                self._tokens -= 1
        if wanted:
            self._in_flight.update((i, now) for i in wanted)
            self._subscribe([self._topics.release_chunk(sha, i) for i in wanted])

    def _verify(self, download: Download) -> InstallReady | None:
        info = download.info
        self._set_report(state="verifying", release=info.release, progress=100, reason="")
        archive = self.directory / "incoming" / f"release-{info.release}.fedge"
        archive.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self.view is None:
                return None
            self.view.verify_bundle(info, archive)  # TUF: length and SHA-256 of the whole file
            verify_bundle(archive, self._fleet_keys)  # the bundle's own signature (and every file hash)
        except ReleaseRefusal as exc:
            self._store.discard(info.sha256)
            self._download = None
            self.refuse(info.release, f"{exc.reason}: {exc.detail}")
            return None
        except BundleError as exc:
            self._store.discard(info.sha256)
            self._download = None
            self.refuse(info.release, f"bad_bundle: {exc}")
            return None
        return InstallReady(info=info, archive=archive)

    # -- outcomes (the agent reports what it did with a step's answer) ----------------------

    def refuse(self, release: int, reason: str) -> None:
        """Refuse ``release`` for good (it is not fetched again) and say why in the status."""
        if release in self.memory.refused:
            return
        logger.error("release %d refused: %s", release, reason)
        self.save(self.memory.with_refused(release, reason))
        self._set_report(state="refused", release=release, progress=0, reason=reason)

    def installed(self, info: ReleaseInfo) -> None:
        """The agent installed ``info``'s bundle: forget its chunks."""
        self._store.discard(info.sha256)
        self._stop_download()
        (self.directory / "incoming" / f"release-{info.release}.fedge").unlink(missing_ok=True)

    def save(self, memory: ReleaseMemory) -> None:
        """Replace the persisted memory (the agent records running release, trials, failures through this)."""
        self.memory = memory
        self._state.save(memory)

    def set_report(self, report: ReleaseReport) -> None:
        """Persist and publish ``report``."""
        self.save(replace(self.memory, report=report))
        if self.on_report is not None:
            self.on_report(report)

    def _set_report(self, *, state: str, release: int | None, progress: int, reason: str) -> None:
        old = self.memory.report
        new = ReleaseReport(state=state, release=release, progress=progress, reason=reason,
                            baseline_accuracy=old.baseline_accuracy if release == old.release else None)
        if new != old:
            self.set_report(new)

    def _stop_download(self) -> None:
        if self._download is not None and self._in_flight:
            sha = self._download.info.sha256
            self._unsubscribe([self._topics.release_chunk(sha, i) for i in self._in_flight])
        self._in_flight.clear()
        self._bad.clear()
        self._download = None

    def _target_bytes(self, sha256: str) -> bytes | None:
        download = self._download
        if download is None or download.info.sha256 != sha256 or not download.complete:
            return None
        return download.read_all()
