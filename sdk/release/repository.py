"""A fleet's TUF repository on the operator's disk: create it, add releases, stage them, rotate keys.

Roles (TUF spec, consistent snapshots on)::

    root       keys and thresholds of every top-level role          offline, e.g. 2 of 3
    targets    the releases: bundle hash, length, custom.fedge      offline, 1 (or 2) of 2
      rollout  delegated for ``rollout/*`` only: stage records      online (the release controller)
    snapshot   the versions of targets and rollout                  online
    timestamp  the version (and hash) of snapshot; short expiry     online

Files: ``metadata/<N>.root.json`` (every version: devices walk them),
``metadata/<N>.targets.json``, ``<N>.rollout.json``, ``<N>.snapshot.json``,
``metadata/timestamp.json``, and the bundles under
``targets/releases/<R>/<sha256>.bundle.fedge``. Every change bumps the version
of each role it touches and re-signs snapshot and timestamp, so a device sees
one consistent state. Nothing is written unless the role's threshold of
signatures is met. What goes onto the broker is :meth:`ReleaseRepository.published_files`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from device_agent.errors import FedgeError
from device_agent.release.release_info import (
    STAGE_PREFIX,
    ReleaseInfo,
    Stage,
    StageRecord,
    parse_release,
    parse_stage,
    release_number,
    release_path,
    stage_path,
)
from device_agent.state_store import atomic_write_bytes
from sdk.release.keys import KeyPolicy, ReleaseKeyError, tuf_key

logger = logging.getLogger(__name__)

ROLLOUT = "rollout"
_VERSIONED = re.compile(r"([1-9][0-9]*)\.(root|targets|rollout|snapshot)\.json")
Signers = Mapping[str, Sequence[Signer]]
"""role -> the signers available for it (private keys the operator has at hand)."""


class RepositoryError(FedgeError):
    """The release repository cannot do what was asked (missing, damaged, or a rule would break)."""


@dataclass(frozen=True, kw_only=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid after it is signed.

    The online roles expire fast on purpose (TUF's freeze protection: a device
    refuses a frozen view); the release controller re-signs them well before
    (:meth:`ReleaseRepository.refresh_online`).
    """

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=365)
    rollout: timedelta = timedelta(days=7)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def of(self, role: str) -> timedelta:
        """The validity of ``role``'s metadata."""
        return getattr(self, role)  # type: ignore[no-any-return]


@dataclass(frozen=True, kw_only=True)
class ReleaseEntry:
    """A release and the stage record that goes with it (None: not staged yet, nobody installs it)."""

    info: ReleaseInfo
    stage: StageRecord | None

    @property
    def stage_name(self) -> str:
        """The stage's value, ``unstaged`` without a record."""
        return "unstaged" if self.stage is None else self.stage.stage.value


@dataclass
class _Role:
    md: Metadata[Any]
    raw: bytes


def _utc(when: datetime) -> datetime:
    return when.astimezone(timezone.utc).replace(microsecond=0)


class ReleaseRepository:
    """The repository in ``directory`` (see the module docstring); ``clock`` gives the current UTC time."""

    def __init__(self, directory: str | os.PathLike[str], *, clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 expiry: ExpiryPolicy = ExpiryPolicy()) -> None:
        self.directory = Path(directory)
        self.metadata_dir = self.directory / "metadata"
        self.targets_dir = self.directory / "targets"
        self._clock = clock
        self.expiry = expiry
        if not (self.metadata_dir / "timestamp.json").is_file():
            raise RepositoryError(f"{self.directory} is not a release repository (no metadata/timestamp.json); "
                                  "create one with `fedge release init` or `fedge fleet init`")
        self.root = self._load_latest("root", Root)
        self.targets = self._load_latest("targets", Targets)
        self.rollout = self._load_latest(ROLLOUT, Targets)
        self.snapshot = self._load_latest("snapshot", Snapshot)
        self.timestamp = self._load(self.metadata_dir / "timestamp.json", Timestamp)

    # -- creation -----------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str | os.PathLike[str], *, public_keys: Mapping[str, Sequence[Ed25519PublicKey]],
               signers: Signers, policy: KeyPolicy = KeyPolicy(), expiry: ExpiryPolicy = ExpiryPolicy(),
               clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> ReleaseRepository:
        """A new repository: root (every role's keys and thresholds), empty targets delegating ``rollout/*``
        to the rollout role, snapshot and timestamp, each signed by its threshold of ``signers``."""
        path = Path(directory)
        if (path / "metadata").exists():
            raise RepositoryError(f"{path}/metadata already exists: a repository is created once (rotate keys instead)")
        now = _utc(clock())
        root = Root(expires=now + expiry.root, consistent_snapshot=True)
        for role in ("root", "targets", "snapshot", "timestamp"):
            keys = public_keys.get(role, ())
            if len(keys) < policy.threshold(role):
                raise ReleaseKeyError(f"{role}: {len(keys)} public key(s) for a threshold of {policy.threshold(role)}")
            for key in keys:
                root.add_key(tuf_key(key), role)
            root.roles[role].threshold = policy.threshold(role)
        targets = Targets(expires=now + expiry.targets)
        targets.delegations = _rollout_delegation(public_keys.get(ROLLOUT, ()), policy.threshold(ROLLOUT))
        (path / "metadata").mkdir(parents=True)
        (path / "targets").mkdir(exist_ok=True)
        _write(path / "metadata" / "1.root.json", _sign(Metadata(root), "root", signers, root))
        targets_md = Metadata(targets)
        _write(path / "metadata" / "1.targets.json", _sign(targets_md, "targets", signers, root))
        rollout = Metadata(Targets(expires=now + expiry.rollout))
        _write(path / "metadata" / f"1.{ROLLOUT}.json", _sign(rollout, ROLLOUT, signers, targets))
        snapshot = Snapshot(expires=now + expiry.snapshot)
        snapshot.meta = {"targets.json": MetaFile(1), f"{ROLLOUT}.json": MetaFile(1)}
        snap_raw = _sign(Metadata(snapshot), "snapshot", signers, root)
        _write(path / "metadata" / "1.snapshot.json", snap_raw)
        timestamp = Timestamp(expires=now + expiry.timestamp, snapshot_meta=_metafile(1, snap_raw))
        _write(path / "metadata" / "timestamp.json", _sign(Metadata(timestamp), "timestamp", signers, root))
        logger.info("created the release repository in %s", path)
        return cls(path, clock=clock, expiry=expiry)

    # -- reading ------------------------------------------------------------------------------

    def releases(self) -> list[ReleaseEntry]:
        """Every release in targets, oldest first, with its stage record (None when unstaged)."""
        stages = {}
        for path, target in self.rollout.md.signed.targets.items():
            record = parse_stage(path, target.custom)
            stages[record.release] = record
        entries = []
        for path, target in self.targets.md.signed.targets.items():
            if release_number(path) is None:
                continue
            info = parse_release(path, target.length, target.hashes, target.custom)
            entries.append(ReleaseEntry(info=info, stage=stages.get(info.release)))
        return sorted(entries, key=lambda e: e.info.release)

    def release(self, number: int) -> ReleaseEntry:
        """Release ``number``; RepositoryError when there is none."""
        for entry in self.releases():
            if entry.info.release == number:
                return entry
        raise RepositoryError(f"there is no release {number} (releases: {', '.join(str(e.info.release) for e in self.releases()) or 'none'})")

    def bundle_file(self, info: ReleaseInfo) -> Path:
        """Where the repository keeps release ``info``'s bundle (hash-prefixed, as devices ask for it)."""
        return self.targets_dir / "releases" / str(info.release) / f"{info.sha256}.bundle.fedge"

    def published_files(self) -> dict[str, bytes]:
        """What the broker must hold: file name -> bytes for every root version and the current
        targets, rollout, snapshot and timestamp (devices ask for exactly these names)."""
        files = {}
        for path in sorted(self.metadata_dir.glob("*.root.json")):
            if _VERSIONED.fullmatch(path.name):
                files[path.name] = path.read_bytes()
        for name, role in (("targets", self.targets), (ROLLOUT, self.rollout), ("snapshot", self.snapshot)):
            files[f"{role.md.signed.version}.{name}.json"] = role.raw
        files["timestamp.json"] = self.timestamp.raw
        return files

    def expires(self) -> dict[str, datetime]:
        """role -> when its current metadata expires (UTC)."""
        return {name: role.md.signed.expires for name, role in
                (("root", self.root), ("targets", self.targets), (ROLLOUT, self.rollout), ("snapshot", self.snapshot),
                 ("timestamp", self.timestamp))}

    # -- changes ------------------------------------------------------------------------------

    def add_release(self, info: ReleaseInfo, bundle: bytes, signers: Signers, *, stage: StageRecord | None) -> ReleaseEntry:
        """Add release ``info`` (its bundle ``bundle``) signed by targets, with its first stage record (rollout).

        The release number must exceed every earlier one (monotonic), and the
        bundle must match ``info``'s length and SHA-256.
        """
        existing = self.releases()
        if existing and info.release <= existing[-1].info.release:
            raise RepositoryError(f"release {info.release} is not newer than release {existing[-1].info.release}: "
                                  "release numbers only go up")
        if len(bundle) != info.length or hashlib.sha256(bundle).hexdigest() != info.sha256:
            raise RepositoryError(f"release {info.release}: the bundle bytes do not match its length and SHA-256")
        target = TargetFile(length=info.length, hashes={"sha256": info.sha256}, path=release_path(info.release),
                            unrecognized_fields={"custom": info.to_custom()})
        targets = Metadata[Targets].from_bytes(self.targets.raw)
        targets.signed.targets[target.path] = target
        self._bump(targets.signed, "targets")
        file = self.bundle_file(info)
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(file, bundle)
        targets_raw = _sign(targets, "targets", signers, self.root.md.signed)
        rollout_raw = self._staged(stage, signers, Metadata.from_bytes(targets_raw)) if stage is not None else None
        self._commit(signers, targets_raw=targets_raw, rollout_raw=rollout_raw)
        logger.info("added release %d (bundle v%d, %d bytes)", info.release, info.bundle_version, info.length)
        return self.release(info.release)

    def set_stage(self, record: StageRecord, signers: Signers) -> ReleaseEntry:
        """Replace release ``record.release``'s stage record (rollout role), then snapshot and timestamp."""
        self.release(record.release)  # it must exist
        self._commit(signers, rollout_raw=self._staged(record, signers, self.targets.md))
        logger.info("release %d is now %s (%s)", record.release, record.stage.value, record.reason)
        return self.release(record.release)

    def refresh_online(self, signers: Signers, *, margin: timedelta | None = None, force: bool = False) -> list[str]:
        """Re-sign the online roles whose metadata expires within ``margin`` (default: half their validity);
        the roles re-signed (empty: nothing was due). ``force`` re-signs timestamp regardless."""
        now = _utc(self._clock())
        due = []
        for name, role in ((ROLLOUT, self.rollout), ("snapshot", self.snapshot), ("timestamp", self.timestamp)):
            left = role.md.signed.expires - now
            if left <= (margin if margin is not None else self.expiry.of(name) / 2):
                due.append(name)
        if force and "timestamp" not in due:
            due.append("timestamp")
        if not due:
            return []
        rollout_raw = None
        if ROLLOUT in due:
            rollout = Metadata[Targets].from_bytes(self.rollout.raw)
            self._bump(rollout.signed, ROLLOUT)
            rollout_raw = _sign(rollout, ROLLOUT, signers, self.targets.md.signed)
        if rollout_raw is not None or "snapshot" in due:
            self._commit(signers, rollout_raw=rollout_raw)
        else:
            self._write_timestamp(signers, self.snapshot.raw, self.snapshot.md.signed.version)
        return due

    def sign_timestamp(self, signers: Signers, *, expires: datetime) -> None:
        """A new timestamp with an explicit expiry (for tests and drills: a past time makes devices see expired metadata)."""
        timestamp = Metadata[Timestamp].from_bytes(self.timestamp.raw)
        timestamp.signed.version += 1
        timestamp.signed.expires = _utc(expires)
        _write(self.metadata_dir / "timestamp.json", _sign(timestamp, "timestamp", signers, self.root.md.signed))
        self.timestamp = self._load(self.metadata_dir / "timestamp.json", Timestamp)

    def rotate(self, role: str, keys: Sequence[Ed25519PublicKey], *, threshold: int, signers: Signers,
               new_root_signers: Sequence[Signer] = ()) -> int:
        """Give ``role`` the keys ``keys`` (replacing its old ones) and ``threshold`` in a new root version,
        signed by the old root's threshold and (for ``role`` root) the new one's; then re-sign what that
        role signs. Devices follow the new root without reflashing. The new root version."""
        if not 1 <= threshold <= len(keys):
            raise ValueError(f"threshold must be in 1..{len(keys)}, got {threshold}")
        old_root = self.root.md.signed
        if role == ROLLOUT:
            targets = Metadata[Targets].from_bytes(self.targets.raw)
            targets.signed.delegations = _rollout_delegation(keys, threshold)
            self._bump(targets.signed, "targets")
            targets_raw = _sign(targets, "targets", signers, old_root)
            rollout = Metadata[Targets].from_bytes(self.rollout.raw)
            self._bump(rollout.signed, ROLLOUT)
            self._commit(signers, targets_raw=targets_raw, rollout_raw=_sign(rollout, ROLLOUT, signers, targets.signed))
            return old_root.version
        new = Metadata[Root].from_bytes(self.root.raw)
        for keyid in list(new.signed.roles[role].keyids):
            new.signed.revoke_key(keyid, role)
        for key in keys:
            new.signed.add_key(tuf_key(key), role)
        new.signed.roles[role].threshold = threshold
        self._bump(new.signed, "root")
        combined = {**signers, "root": [*signers.get("root", ()), *new_root_signers]}
        raw = _sign(new, "root", combined, old_root)
        _verify(new, "root", new.signed)  # the new root must satisfy its own threshold too
        _write(self.metadata_dir / f"{new.signed.version}.root.json", raw)
        self.root = _Role(new, raw)
        logger.info("root v%d: %s now has %d key(s), threshold %d", new.signed.version, role, len(keys), threshold)
        if role == "targets":
            targets = Metadata[Targets].from_bytes(self.targets.raw)
            self._bump(targets.signed, "targets")
            self._commit(signers, targets_raw=_sign(targets, "targets", signers, new.signed))
        elif role in ("snapshot", "timestamp"):
            self._commit(signers)
        return new.signed.version

    # -- internals ----------------------------------------------------------------------------

    def _staged(self, record: StageRecord, signers: Signers, targets: Metadata[Targets]) -> bytes:
        rollout = Metadata[Targets].from_bytes(self.rollout.raw)
        path = stage_path(record.release)
        assert path.startswith(STAGE_PREFIX)
        rollout.signed.targets[path] = TargetFile(length=0, hashes={"sha256": hashlib.sha256(b"").hexdigest()}, path=path,
                                                  unrecognized_fields={"custom": record.to_custom()})
        self._bump(rollout.signed, ROLLOUT)
        return _sign(rollout, ROLLOUT, signers, targets.signed)

    def _bump(self, signed: Signed, role: str) -> None:
        signed.version += 1
        signed.expires = _utc(self._clock()) + self.expiry.of(role)

    def _commit(self, signers: Signers, *, targets_raw: bytes | None = None, rollout_raw: bytes | None = None) -> None:
        """Write the given role files, then a new snapshot naming them and a new timestamp."""
        root = self.root.md.signed
        snapshot = Metadata[Snapshot].from_bytes(self.snapshot.raw)
        if targets_raw is not None:
            targets = Metadata[Targets].from_bytes(targets_raw)
            _write(self.metadata_dir / f"{targets.signed.version}.targets.json", targets_raw)
            snapshot.signed.meta["targets.json"] = MetaFile(targets.signed.version)
            self.targets = _Role(targets, targets_raw)
        if rollout_raw is not None:
            rollout = Metadata[Targets].from_bytes(rollout_raw)
            _write(self.metadata_dir / f"{rollout.signed.version}.{ROLLOUT}.json", rollout_raw)
            snapshot.signed.meta[f"{ROLLOUT}.json"] = MetaFile(rollout.signed.version)
            self.rollout = _Role(rollout, rollout_raw)
        self._bump(snapshot.signed, "snapshot")
        snap_raw = _sign(snapshot, "snapshot", signers, root)
        _write(self.metadata_dir / f"{snapshot.signed.version}.snapshot.json", snap_raw)
        self.snapshot = _Role(snapshot, snap_raw)
        self._write_timestamp(signers, snap_raw, snapshot.signed.version)

    def _write_timestamp(self, signers: Signers, snap_raw: bytes, snap_version: int) -> None:
        timestamp = Metadata[Timestamp].from_bytes(self.timestamp.raw)
        self._bump(timestamp.signed, "timestamp")
        timestamp.signed.snapshot_meta = _metafile(snap_version, snap_raw)
        _write(self.metadata_dir / "timestamp.json", _sign(timestamp, "timestamp", signers, self.root.md.signed))
        self.timestamp = self._load(self.metadata_dir / "timestamp.json", Timestamp)

    def _load_latest(self, role: str, kind: type[Signed]) -> _Role:
        versions = [int(m.group(1)) for p in self.metadata_dir.glob(f"*.{role}.json")
                    if (m := _VERSIONED.fullmatch(p.name)) and m.group(2) == role]
        if not versions:
            raise RepositoryError(f"{self.metadata_dir}: no {role} metadata")
        return self._load(self.metadata_dir / f"{max(versions)}.{role}.json", kind)

    @staticmethod
    def _load(path: Path, kind: type[Signed]) -> _Role:
        try:
            raw = path.read_bytes()
            md: Metadata[Any] = Metadata.from_bytes(raw)
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"{path}: unreadable TUF metadata: {exc}") from exc
        if not isinstance(md.signed, kind):
            raise RepositoryError(f"{path}: expected {kind.type} metadata, found {md.signed.type}")
        return _Role(md, raw)


def _rollout_delegation(keys: Sequence[Ed25519PublicKey], threshold: int) -> Delegations:
    tuf_keys = [tuf_key(k) for k in keys]
    if len(tuf_keys) < threshold:
        raise ReleaseKeyError(f"{ROLLOUT}: {len(tuf_keys)} public key(s) for a threshold of {threshold}")
    role = DelegatedRole(ROLLOUT, [k.keyid for k in tuf_keys], threshold, terminating=True, paths=[f"{STAGE_PREFIX}*"])
    return Delegations(keys={k.keyid: k for k in tuf_keys}, roles={ROLLOUT: role})


def _metafile(version: int, raw: bytes) -> MetaFile:
    return MetaFile(version=version, length=len(raw), hashes={"sha256": hashlib.sha256(raw).hexdigest()})


def _sign(md: Metadata[Any], role: str, signers: Signers, delegator: Root | Targets) -> bytes:
    """Sign ``md`` with every available signer of ``role`` and check the delegator's threshold is met."""
    md.signatures.clear()
    available = list(signers.get(role, ()))
    for signer in available:
        md.sign(signer, append=True)
    _verify(md, role, delegator)
    return md.to_bytes(JSONSerializer(compact=True))


def _verify(md: Metadata[Any], role: str, delegator: Root | Targets) -> None:
    try:
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as exc:
        threshold = delegator.get_delegated_role(role).threshold
        raise ReleaseKeyError(f"{role}: {exc}; it needs {threshold} of its keys: pass the directory holding "
                              f"the {role}-*.key files (--key-dir)") from None


def _write(path: Path, raw: bytes) -> None:
    atomic_write_bytes(path, raw)
