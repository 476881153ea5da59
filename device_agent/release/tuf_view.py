"""The device's TUF client: python-tuf's ``Updater`` over what MQTT delivered, and the releases it vouches for.

MQTT is a push transport: the broker hands the device every retained
metadata file when it subscribes and each new one as it is published, and
bundle chunks when it asks for them. :class:`BrokerFetcher` is the python-tuf
``FetcherInterface`` that serves the Updater's requests from those messages
(a file the broker does not hold is an HTTP 404 to the Updater), so every
check of the TUF client workflow runs unchanged: root rotation walk,
threshold signatures, rollback (version numbers never go back), freeze
(expiry), mix-and-match (snapshot pins every role's version, timestamp pins
snapshot's hash), and the bundle's length and SHA-256.

:func:`refresh_view` runs one refresh (an Updater refreshes once) and returns a
:class:`TrustedView`: the releases in the trusted ``targets`` role and their
stage records (walked through the delegated ``rollout`` role). TUF's errors
become a :class:`ReleaseRefusal` with a short reason code for the device's status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from device_agent.errors import FedgeError
from device_agent.release.release_info import (
    ReleaseInfo,
    ReleaseMetadataError,
    StageRecord,
    parse_release,
    parse_stage,
    release_number,
    stage_path,
)

logger = logging.getLogger(__name__)

METADATA_URL = "mqtt://release/metadata/"
TARGETS_URL = "mqtt://release/targets/"
#: Limits for metadata the device accepts (python-tuf's defaults are sized for large repositories).
UPDATER_CONFIG = UpdaterConfig(max_root_rotations=64, max_delegations=4, root_max_length=64_000,
                               timestamp_max_length=8_000, snapshot_max_length=64_000, targets_max_length=2_000_000)


class ReleaseRefusal(FedgeError):
    """TUF (or the fedge metadata) refused what the broker holds. ``reason``: a short code for the status.

    Codes: ``expired_metadata`` (freeze), ``metadata_rollback`` (a version went
    back), ``untrusted_metadata`` (signature threshold not met), ``hash_mismatch``
    (a file differs from what signed metadata says: tampering), ``bad_metadata``,
    ``bad_release_metadata``, and ``incomplete`` (a file is not on the broker
    (yet): transient, retried).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def transient(self) -> bool:
        """True when trying again later may succeed (a file missing from the broker)."""
        return self.reason == "incomplete"


class BrokerFetcher(FetcherInterface):
    """Serves the Updater from broker messages: ``metadata(name)`` and ``target(sha256)`` return bytes or None (404)."""

    def __init__(self, *, metadata: Callable[[str], bytes | None], target: Callable[[str], bytes | None]) -> None:
        self._metadata = metadata
        self._target = target

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url.startswith(METADATA_URL):
            data = self._metadata(url[len(METADATA_URL):])
        elif url.startswith(TARGETS_URL):
            name = url.rsplit("/", 1)[-1]
            sha256 = name.split(".", 1)[0]
            data = self._target(sha256)
        else:
            raise tuf_errors.DownloadHTTPError(f"{url} is not a fedge release URL", 404)
        if data is None:
            raise tuf_errors.DownloadHTTPError(f"{url} is not on the broker", 404)
        return iter((data,))


@dataclass(frozen=True, kw_only=True)
class TrustedView:
    """What the trusted metadata says: every release (oldest first) and its stage record (absent: unstaged).

    ``skipped`` lists release targets whose fedge metadata did not parse (path, reason).
    """

    releases: tuple[ReleaseInfo, ...]
    stages: dict[int, StageRecord]
    timestamp_version: int
    skipped: tuple[tuple[str, str], ...] = ()
    updater: Updater | None = None

    def stage_of(self, release: int) -> StageRecord | None:
        """Release ``release``'s stage record, None when unstaged."""
        return self.stages.get(release)

    def release(self, number: int) -> ReleaseInfo | None:
        """Release ``number``, None when the trusted targets do not list it."""
        return next((r for r in self.releases if r.release == number), None)

    def verify_bundle(self, info: ReleaseInfo, dest: Path) -> Path:
        """Let TUF check the assembled bundle against the trusted target (length and SHA-256) and write it to ``dest``."""
        if self.updater is None:
            raise ValueError("this view has no updater")
        try:
            target = self.updater.get_targetinfo(info.path)
            if target is None:
                raise ReleaseRefusal("bad_metadata", f"{info.path} is no longer a trusted target")
            return Path(self.updater.download_target(target, filepath=str(dest)))
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            raise refusal_from(exc) from exc


def refresh_view(metadata_dir: Path, *, bootstrap_root: bytes, fetcher: FetcherInterface) -> TrustedView:
    """One TUF refresh from the trusted ``bootstrap_root`` (walking newer roots) and the releases it vouches for.

    ReleaseRefusal when TUF refuses the metadata (or it is incomplete).
    """
    metadata_dir.mkdir(parents=True, exist_ok=True)
    try:
        updater = Updater(str(metadata_dir), METADATA_URL, target_base_url=TARGETS_URL, fetcher=fetcher,
                          config=UPDATER_CONFIG, bootstrap=bootstrap_root)
        updater.refresh()
        # The Updater stores targets.json only after verifying it against snapshot (and
        # keeps no public listing of it): read the trusted copy to enumerate releases.
        trusted = Metadata[Targets].from_file(str(metadata_dir / "targets.json")).signed
        timestamp = Metadata.from_file(str(metadata_dir / "timestamp.json")).signed.version
        releases, skipped, stages = [], [], {}
        for path, target in sorted(trusted.targets.items()):
            if release_number(path) is None:
                continue
            try:
                info = parse_release(path, target.length, target.hashes, target.custom)
                stage_target = updater.get_targetinfo(stage_path(info.release))
                if stage_target is not None:
                    stages[info.release] = parse_stage(stage_target.path, stage_target.custom)
            except ReleaseMetadataError as exc:
                logger.warning("skipping release target %s: %s", path, exc)
                skipped.append((path, str(exc)))
                continue
            releases.append(info)
    except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
        raise refusal_from(exc) from exc
    except (OSError, ValueError) as exc:
        raise ReleaseRefusal("bad_metadata", str(exc)) from exc
    return TrustedView(releases=tuple(sorted(releases, key=lambda r: r.release)), stages=stages,
                       timestamp_version=timestamp, skipped=tuple(skipped), updater=updater)


def refusal_from(exc: Exception) -> ReleaseRefusal:
    """The :class:`ReleaseRefusal` for one of python-tuf's exceptions."""
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return ReleaseRefusal("expired_metadata", str(exc))
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        return ReleaseRefusal("metadata_rollback", str(exc))
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        return ReleaseRefusal("untrusted_metadata", str(exc))
    if isinstance(exc, (tuf_errors.LengthOrHashMismatchError, tuf_errors.DownloadLengthMismatchError)):
        return ReleaseRefusal("hash_mismatch", str(exc))
    if isinstance(exc, tuf_errors.DownloadError):
        return ReleaseRefusal("incomplete", str(exc))
    return ReleaseRefusal("bad_metadata", str(exc))
