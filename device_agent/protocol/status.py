"""Device status: what one device says about itself, signed with its identity key, retained on its status topic.

Layout (the signed frame of every fedge message, no body)::

    b"FDGS" | version u8 | record_len u16 | status (canonical JSON) | Ed25519 signature 64

The record is canonical JSON like every header (sorted keys, no spaces, one
spelling): floats (training loss, validation accuracy) travel as the
shortest ``repr`` string that round-trips (``"0.6931"``, ``"nan"``,
``"inf"``) because the canonical form admits no JSON numbers but integers,
and a diverging loss must be reportable. ``release`` is a nested object
(:class:`ReleaseStatus`) that the rollout code fills.

The device publishes its status retained at QoS 1 after each connect and
after every round phase that changes it; the broker publishes a signed
*offline* status, built at connect time, as the device's last will. So a
will carries the fields as they stood when the device connected: readers show
its ``timestamp_ms`` as "offline, last known as of". :func:`open_status` is
the one parser: size, structure, ids, the signature against the device's
registered key (unknown device or bad signature: the opaque
:class:`~device_agent.errors.AuthenticationError`), then fleet and the topic's
device and region.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any, ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.errors import MalformedMessageError
from device_agent.protocol._frame import SIGNATURE_BYTES, frame_prefix, sign_frame, split_frame, verify_frame
from device_agent.protocol.envelope import SenderKeys, lookup_sender
from device_agent.protocol.headers import (
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    CanonicalRecord,
    as_enum,
    check_id,
    check_int,
    check_protocol,
)

STATUS_MAGIC = b"FDGS"
MAX_STATUS_BYTES = 7 + MAX_HEADER_BYTES + SIGNATURE_BYTES
MAX_REASON_CHARS = 200
"""Longest free-text reason (round failure, refused release) a status carries; longer ones are cut by :func:`short_text`."""
_CODE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_VERSION_TEXT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,31}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


class ReleaseState(str, Enum):
    """Where the device stands with a release: nothing offered (``idle``), the steps of taking one, or how it ended."""

    IDLE = "idle"
    FETCHING = "fetching"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    INSTALLED = "installed"
    REFUSED = "refused"
    ROLLED_BACK = "rolled_back"


def short_text(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` as one line of printable ASCII, at most ``limit`` characters (what a status may carry)."""
    flat = " ".join(str(text).split())
    flat = flat.encode("ascii", "replace").decode("ascii")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _check_text(field: str, value: object) -> None:
    if not isinstance(value, str) or len(value) > MAX_REASON_CHARS or not _PRINTABLE.fullmatch(value):
        raise ValueError(f"{field} must be printable ASCII of at most {MAX_REASON_CHARS} characters (see short_text)")


def _check_optional_int(field: str, value: object) -> None:
    if value is not None:
        check_int(field, value)


def _as_float(field: str, value: object) -> float | None:
    """None, a float, or its canonical wire string (``repr``) as a float; ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parsed = float(value)
        except ValueError:
            raise ValueError(f"{field} {value!r} is not a number") from None
        if repr(parsed) != value:
            raise ValueError(f"{field} {value!r} is not in canonical form (expected {repr(parsed)!r})")
        return parsed
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number or None, got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class ReleaseStatus:
    """The device's view of the release it is taking or took.

    ``version`` None: no release named. ``progress``: percent (0..100) of the
    current step (fetching: bytes received). ``reason``: why it was refused or
    rolled back (empty otherwise). ``baseline_accuracy``: the previous
    version's validation accuracy, measured on the same data just before the
    switch (None: not measured); with ``last_val_accuracy`` it is the canary's
    health (docs/rollout.md).
    """

    state: ReleaseState = ReleaseState.IDLE
    version: int | None = None
    progress: int = 0
    reason: str = ""
    baseline_accuracy: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", as_enum("release.state", ReleaseState, self.state))
        _check_optional_int("release.version", self.version)
        if isinstance(self.progress, bool) or not isinstance(self.progress, int) or not 0 <= self.progress <= 100:
            raise ValueError(f"release.progress must be an integer percent in 0..100, got {self.progress!r}")
        _check_text("release.reason", self.reason)
        object.__setattr__(self, "baseline_accuracy", _as_float("release.baseline_accuracy", self.baseline_accuracy))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (``baseline_accuracy`` as its ``repr`` string, like the status's floats)."""
        baseline = None if self.baseline_accuracy is None else repr(self.baseline_accuracy)
        return {"baseline_accuracy": baseline, "progress": self.progress, "reason": self.reason,
                "state": self.state.value, "version": self.version}

    @classmethod
    def from_dict(cls, data: object) -> ReleaseStatus:
        """Strict parse of :meth:`to_dict`'s output (ValueError for missing or extra keys)."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"release must be an object with exactly the keys {sorted(names)}")
        return cls(**data)


_FLOAT_FIELDS = ("last_loss", "last_val_accuracy")


@dataclass(frozen=True, kw_only=True)
class DeviceStatus(CanonicalRecord):
    """One device's signed account of itself (module docstring).

    ``sequence`` counts the statuses one agent process signed (from 0; with
    ``timestamp_ms`` it orders them). ``online`` False: a clean shutdown or the
    last will. None means "not known yet": no bundle installed
    (``bundle_model``/``bundle_version``/``backend``), no round played
    (``last_round``), no loss or accuracy measured, free memory unreadable.
    ``last_round_status`` is the round's outcome code (``accepted``,
    ``rejected``, ``failed``... ; empty before the first round) and
    ``last_round_reason`` its reason, if any. ``uptime_s``: seconds the agent
    process has run.
    """

    _WHAT: ClassVar[str] = "device status"

    protocol: int = PROTOCOL_VERSION
    fleet: str
    region: str
    device: str
    sequence: int
    timestamp_ms: int
    online: bool
    agent_version: str
    bundle_model: str | None = None
    bundle_version: int | None = None
    backend: str | None = None
    last_round: int | None = None
    last_round_status: str = ""
    last_round_reason: str = ""
    last_loss: float | None = None
    last_val_accuracy: float | None = None
    free_memory_bytes: int | None = None
    uptime_s: int = 0
    release: ReleaseStatus = ReleaseStatus()

    def __post_init__(self) -> None:
        check_protocol(self.protocol)
        for name in ("fleet", "region", "device"):
            check_id(name, getattr(self, name))
        check_id("bundle_model", self.bundle_model, optional=True)
        check_id("backend", self.backend, optional=True)
        for name in ("sequence", "timestamp_ms", "uptime_s"):
            check_int(name, getattr(self, name))
        for name in ("bundle_version", "last_round", "free_memory_bytes"):
            _check_optional_int(name, getattr(self, name))
        if not isinstance(self.online, bool):
            raise ValueError(f"online must be true or false, got {self.online!r}")
        if not isinstance(self.agent_version, str) or not _VERSION_TEXT.fullmatch(self.agent_version):
            raise ValueError(f"agent_version {self.agent_version!r} is not a version string")
        if self.last_round_status != "" and not (isinstance(self.last_round_status, str)
                                                 and _CODE.fullmatch(self.last_round_status)):
            raise ValueError(f"last_round_status must be empty or a code [a-z][a-z0-9_]{{0,31}}, got {self.last_round_status!r}")
        _check_text("last_round_reason", self.last_round_reason)
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        release = self.release
        if isinstance(release, dict):
            release = ReleaseStatus.from_dict(release)
        if not isinstance(release, ReleaseStatus):
            raise ValueError("release must be a ReleaseStatus")
        object.__setattr__(self, "release", release)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: floats as their ``repr`` strings, ``release`` as an object."""
        out = super().to_dict()
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            out[name] = None if value is None else repr(value)
        out["release"] = self.release.to_dict()
        return out

    @property
    def loss_is_finite(self) -> bool:
        """Whether a last training loss is known and finite (a canary health check)."""
        return self.last_loss is not None and math.isfinite(self.last_loss)


def sign_status(status: DeviceStatus, *, signer_key: Ed25519PrivateKey) -> bytes:
    """The signed wire form of ``status`` (signed with the device's identity key)."""
    if not isinstance(status, DeviceStatus):
        raise TypeError("status must be a DeviceStatus")
    return sign_frame(frame_prefix(STATUS_MAGIC, status.to_bytes()), signer_key)


def open_status(
    blob: bytes | bytearray | memoryview,
    *,
    device_keys: SenderKeys,
    fleet: str,
    device: str | None = None,
    region: str | None = None,
) -> DeviceStatus:
    """Parse and verify a status signed by ``status.device`` (looked up in ``device_keys``) for ``fleet``.

    ``device`` / ``region`` (None: unchecked) are what the topic it arrived
    on names: a status must be about the device whose topic carries it.
    AuthenticationError: unknown device or bad signature. MalformedMessageError:
    anything structurally wrong, or a status for another fleet, device or region.
    """
    frame = split_frame(blob, magic=STATUS_MAGIC, what="device status", min_body=0, max_bytes=MAX_STATUS_BYTES)
    if len(frame.body):
        raise MalformedMessageError(f"device status: {len(frame.body)} unexpected bytes after the record")
    status = DeviceStatus.from_bytes(frame.record)
    verify_frame(frame, [lookup_sender(device_keys, status.device)])
    if status.fleet != fleet:
        raise MalformedMessageError(f"device status of fleet {status.fleet!r}, this is {fleet!r}")
    if device is not None and status.device != device:
        raise MalformedMessageError(f"status of {status.device!r} on the topic of {device!r}")
    if region is not None and status.region != region:
        raise MalformedMessageError(f"status of a device in region {status.region!r} on region {region!r}'s topic")
    return status


def release_changes(current: ReleaseStatus, changes: Mapping[str, Any] | ReleaseStatus) -> ReleaseStatus:
    """``current`` with ``changes`` applied: a whole :class:`ReleaseStatus`, or some of its fields by name."""
    if isinstance(changes, ReleaseStatus):
        return changes
    if not isinstance(changes, Mapping):
        raise TypeError("release changes must be a ReleaseStatus or a mapping of its fields")
    unknown = set(changes) - {f.name for f in fields(ReleaseStatus)}
    if unknown:
        raise ValueError(f"unknown release field(s): {sorted(unknown)}")
    return replace(current, **changes)
