"""What a release says about itself: the fedge part of its signed TUF metadata, parsed once, here.

A release is one TUF *target* (``releases/<N>/bundle.fedge``, signed by the
``targets`` role) whose ``custom`` field holds a ``fedge`` object, plus a
*stage record*: an empty target ``rollout/release-<N>`` signed by the
delegated ``rollout`` role (the release controller's online key) whose
``custom.fedge_stage`` says where the rollout stands. TUF's canonical JSON has
no floats, so every number here is an integer (times in Unix milliseconds,
the accuracy threshold in percentage points)::

    "custom": {"fedge": {
        "release": 2, "bundle_version": 2, "model_name": "digits-mlp", "fleet": "demo",
        "regions": [], "groups": [], "devices": [],        # empty list: no restriction
        "canary": ["eu-dev-0001", "us-dev-0002"],          # devices that install first
        "expires_ms": 1767225600000,                       # not installed after this
        "chunk_size": 65536, "chunk_sha256": ["ab12...", ...],
        "shared_start": "carry",                           # or "bundle": see docs/rollout.md
        "max_accuracy_drop_pct": 20}}
    "custom": {"fedge_stage": {"release": 2, "stage": "promoted", "reason": "2/2 canaries healthy",
                               "decided_ms": 1767000000000}}

:func:`parse_release` and :func:`parse_stage` are the only readers; they raise
:class:`ReleaseMetadataError` naming the field. The operator side builds the
same records (:meth:`ReleaseInfo.to_custom`), so both sides share one schema.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from device_agent.errors import FedgeError
from device_agent.protocol.headers import check_id

RELEASE_PREFIX = "releases/"
STAGE_PREFIX = "rollout/"
MAX_CHUNKS = 65_536
MAX_LIST = 100_000
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REASON = re.compile(r"[\x20-\x7e]{0,200}")
_MAX_INT = (1 << 53) - 1


class ReleaseMetadataError(FedgeError, ValueError):
    """A release's fedge metadata is malformed; the message names the target and the field."""


class Stage(str, Enum):
    """Where a release's rollout stands (the stage record, signed by the ``rollout`` role).

    ``canary``: only the canary devices install it. ``promoted``: every targeted
    device installs it and the aggregators switch to it at a round boundary.
    ``halted``: nobody installs it any more, and a device running it returns to
    the version it kept from before. ``rolled_back``: the same for a release that
    had been promoted (the operator's ``fedge release rollback``).
    """

    CANARY = "canary"
    PROMOTED = "promoted"
    HALTED = "halted"
    ROLLED_BACK = "rolled_back"

    @property
    def withdrawn(self) -> bool:
        """True for ``halted`` and ``rolled_back``: devices running it go back."""
        return self in (Stage.HALTED, Stage.ROLLED_BACK)


class SharedStart(str, Enum):
    """Where the new version's shared layers start: ``carry`` the federation's current weights over
    where names and shapes match (the rest from the bundle), or start every layer from the ``bundle``."""

    CARRY = "carry"
    BUNDLE = "bundle"


@dataclass(frozen=True, kw_only=True)
class ReleaseTargets:
    """Who a release is for. Each empty tuple means "no restriction on this axis"; all axes must match."""

    regions: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()

    def matches(self, *, device: str, region: str, groups: tuple[str, ...] = ()) -> bool:
        """True when ``device`` in ``region`` with ``groups`` is targeted."""
        return ((not self.regions or region in self.regions)
                and (not self.groups or any(g in self.groups for g in groups))
                and (not self.devices or device in self.devices))

    def describe(self) -> str:
        """A short human description (``fleet`` when unrestricted)."""
        parts = [f"{name} {', '.join(values)}" for name, values in
                 (("regions", self.regions), ("groups", self.groups), ("devices", self.devices)) if values]
        return "; ".join(parts) or "fleet"


@dataclass(frozen=True, kw_only=True)
class ReleaseInfo:
    """One release as its signed metadata describes it.

    ``path``: the TUF target path; ``length`` and ``sha256``: the bundle's, from
    the TUF target entry (what TUF itself verifies). The other fields are the
    ``custom.fedge`` object (module docstring).
    """

    path: str
    length: int
    sha256: str
    release: int
    bundle_version: int
    model_name: str
    fleet: str
    targets: ReleaseTargets = ReleaseTargets()
    canary: tuple[str, ...] = ()
    expires_ms: int
    chunk_size: int
    chunk_sha256: tuple[str, ...]
    shared_start: SharedStart = SharedStart.CARRY
    max_accuracy_drop_pct: int = 20

    def __post_init__(self) -> None:
        for name in ("release", "bundle_version", "expires_ms", "length"):
            _int(self.path, name, getattr(self, name), minimum=1 if name == "release" else 0)
        _int(self.path, "chunk_size", self.chunk_size, minimum=1024)
        _int(self.path, "max_accuracy_drop_pct", self.max_accuracy_drop_pct, maximum=100)
        for name in ("model_name", "fleet"):
            _ident(self.path, name, getattr(self, name))
        if not _HEX64.fullmatch(self.sha256):
            raise ReleaseMetadataError(f"{self.path}: the target has no sha256 hash")
        expected = max(1, math.ceil(self.length / self.chunk_size))
        if len(self.chunk_sha256) != expected:
            raise ReleaseMetadataError(f"{self.path}: chunk_sha256 lists {len(self.chunk_sha256)} hashes, "
                                       f"{self.length} bytes in chunks of {self.chunk_size} need {expected}")
        if expected > MAX_CHUNKS or any(not (isinstance(h, str) and _HEX64.fullmatch(h)) for h in self.chunk_sha256):
            raise ReleaseMetadataError(f"{self.path}: chunk_sha256 must be at most {MAX_CHUNKS} lowercase SHA-256 hex digests")
        if self.path != release_path(self.release):
            raise ReleaseMetadataError(f"{self.path}: release {self.release} must live at {release_path(self.release)}")

    @property
    def chunks(self) -> int:
        """How many chunks the bundle travels in."""
        return len(self.chunk_sha256)

    def chunk_length(self, index: int) -> int:
        """The exact length of chunk ``index`` (the last one may be short)."""
        if not 0 <= index < self.chunks:
            raise IndexError(index)
        return min(self.chunk_size, self.length - index * self.chunk_size) if self.length else 0

    def is_canary(self, device: str) -> bool:
        """True when ``device`` is one of this release's canaries."""
        return device in self.canary

    def expired(self, now_ms: int) -> bool:
        """True once the release's own expiry has passed (it is then no longer installed)."""
        return now_ms >= self.expires_ms

    def to_custom(self) -> dict[str, Any]:
        """The ``custom`` object of the TUF target entry (the operator side writes this)."""
        return {"fedge": {
            "release": self.release,
            "bundle_version": self.bundle_version,
            "model_name": self.model_name,
            "fleet": self.fleet,
            "regions": list(self.targets.regions),
            "groups": list(self.targets.groups),
            "devices": list(self.targets.devices),
            "canary": list(self.canary),
            "expires_ms": self.expires_ms,
            "chunk_size": self.chunk_size,
            "chunk_sha256": list(self.chunk_sha256),
            "shared_start": self.shared_start.value,
            "max_accuracy_drop_pct": self.max_accuracy_drop_pct,
        }}


@dataclass(frozen=True, kw_only=True)
class StageRecord:
    """The rollout role's word on release ``release``: its :class:`Stage`, why, and when (Unix ms)."""

    release: int
    stage: Stage
    reason: str = ""
    decided_ms: int = 0

    def __post_init__(self) -> None:
        where = stage_path(self.release) if isinstance(self.release, int) else "stage"
        _int(where, "release", self.release, minimum=1)
        _int(where, "decided_ms", self.decided_ms)
        if not (isinstance(self.reason, str) and _REASON.fullmatch(self.reason)):
            raise ReleaseMetadataError(f"{where}: reason must be at most 200 printable ASCII characters")

    def to_custom(self) -> dict[str, Any]:
        """The ``custom`` object of the stage target entry."""
        return {"fedge_stage": {"release": self.release, "stage": self.stage.value, "reason": self.reason,
                                "decided_ms": self.decided_ms}}


def chunk_digests(data: bytes, chunk_size: int) -> tuple[str, ...]:
    """SHA-256 (hex) of each ``chunk_size`` piece of ``data`` (one empty chunk for empty data)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    pieces = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
    return tuple(hashlib.sha256(piece).hexdigest() for piece in pieces)


def release_path(release: int) -> str:
    """The TUF target path of release ``release``'s bundle."""
    return f"{RELEASE_PREFIX}{release}/bundle.fedge"


def stage_path(release: int) -> str:
    """The TUF target path of release ``release``'s stage record (delegated to the ``rollout`` role)."""
    return f"{STAGE_PREFIX}release-{release}"


def release_number(path: str) -> int | None:
    """The release number a target path names (``releases/<N>/bundle.fedge``), or None for any other path."""
    if not path.startswith(RELEASE_PREFIX) or not path.endswith("/bundle.fedge"):
        return None
    middle = path[len(RELEASE_PREFIX): -len("/bundle.fedge")]
    return int(middle) if middle.isdigit() and not middle.startswith("0") else None


def parse_release(path: str, length: int, hashes: Mapping[str, str], custom: object) -> ReleaseInfo:
    """The release at target ``path`` from its TUF entry (``length``, ``hashes``, ``custom``); ReleaseMetadataError if malformed."""
    if not isinstance(custom, Mapping) or not isinstance(custom.get("fedge"), Mapping):
        raise ReleaseMetadataError(f"{path}: the target carries no custom.fedge object")
    data = dict(custom["fedge"])
    expected = {"release", "bundle_version", "model_name", "fleet", "regions", "groups", "devices", "canary",
                "expires_ms", "chunk_size", "chunk_sha256", "shared_start", "max_accuracy_drop_pct"}
    if set(data) != expected:
        raise ReleaseMetadataError(f"{path}: custom.fedge keys {sorted(data)} differ from {sorted(expected)}")
    try:
        shared_start = SharedStart(data["shared_start"])
    except ValueError:
        raise ReleaseMetadataError(f"{path}: shared_start {data['shared_start']!r} is not 'carry' or 'bundle'") from None
    return ReleaseInfo(
        path=path,
        length=length,
        sha256=str(hashes.get("sha256", "")),
        release=data["release"],
        bundle_version=data["bundle_version"],
        model_name=data["model_name"],
        fleet=data["fleet"],
        targets=ReleaseTargets(regions=_ids(path, "regions", data["regions"]), groups=_ids(path, "groups", data["groups"]),
                               devices=_ids(path, "devices", data["devices"])),
        canary=_ids(path, "canary", data["canary"]),
        expires_ms=data["expires_ms"],
        chunk_size=data["chunk_size"],
        chunk_sha256=tuple(data["chunk_sha256"]) if isinstance(data["chunk_sha256"], list) else (),
        shared_start=shared_start,
        max_accuracy_drop_pct=data["max_accuracy_drop_pct"],
    )


def parse_stage(path: str, custom: object) -> StageRecord:
    """The stage record at target ``path``; ReleaseMetadataError if malformed or for another release."""
    if not isinstance(custom, Mapping) or not isinstance(custom.get("fedge_stage"), Mapping):
        raise ReleaseMetadataError(f"{path}: the target carries no custom.fedge_stage object")
    data = dict(custom["fedge_stage"])
    if set(data) != {"release", "stage", "reason", "decided_ms"}:
        raise ReleaseMetadataError(f"{path}: custom.fedge_stage keys {sorted(data)} differ from the schema")
    try:
        stage = Stage(data["stage"])
    except ValueError:
        raise ReleaseMetadataError(f"{path}: stage {data['stage']!r} is not one of "
                                   f"{', '.join(s.value for s in Stage)}") from None
    record = StageRecord(release=data["release"], stage=stage, reason=data["reason"], decided_ms=data["decided_ms"])
    if path != stage_path(record.release):
        raise ReleaseMetadataError(f"{path}: a stage record for release {record.release} must live at "
                                   f"{stage_path(record.release)}")
    return record


def _int(where: str, field: str, value: object, *, minimum: int = 0, maximum: int = _MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ReleaseMetadataError(f"{where}: {field} must be an integer in {minimum}..{maximum}, got {value!r}")


def _ident(where: str, field: str, value: object) -> None:
    try:
        check_id(field, value)
    except ValueError as exc:
        raise ReleaseMetadataError(f"{where}: {exc}") from None


def _ids(where: str, field: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise ReleaseMetadataError(f"{where}: {field} must be a list of ids")
    for item in value:
        _ident(where, f"{field} entry", item)
    if len(set(value)) != len(value):
        raise ReleaseMetadataError(f"{where}: {field} lists an id twice")
    return tuple(value)
