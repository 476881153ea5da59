"""Message headers and their canonical bytes (compact, sorted-key, ASCII JSON).

A header is parsed only from its canonical form: the parser re-serialises
what it read and rejects any other spelling (key order, spaces, duplicate
keys, floats, unknown or missing keys), so one header has exactly one byte
string to sign. Ids (fleet, region, sender) match ``[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}``,
a subset of what :mod:`device_agent.protocol.topics` accepts as a topic segment.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, ClassVar, TypeVar

from device_agent.compression.spec import CompressionSpec
from device_agent.errors import MalformedMessageError
from device_agent.protocol.tensor_codec import Encoding

PROTOCOL_VERSION = 1
NONCE_BYTES = 16
MAX_CANDIDATES = 32
"""The most FedFomo candidates one device may ask for (and be served) in a round."""
MAX_HEADER_BYTES = 4096
DIGEST_BYTES = 32
_MAX_INT = (1 << 53) - 1  # exact in every JSON reader
_R = TypeVar("_R", bound="CanonicalRecord")
_E = TypeVar("_E", bound=Enum)
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


class MessageKind(str, Enum):
    """What a message carries: a device ``update``, a region ``aggregate``, a signed ``model``,
    or FedFomo ``candidates`` (peers' models sealed to one device)."""

    UPDATE = "update"
    AGGREGATE = "aggregate"
    MODEL = "model"
    CANDIDATES = "candidates"


def check_id(field: str, value: object, *, optional: bool = False) -> None:
    """ValueError unless ``value`` is a valid id (or None when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{field} {value!r} is not a valid id ([A-Za-z0-9][A-Za-z0-9._:@-]{{0,127}})")


def check_int(field: str, value: object, *, minimum: int = 0) -> None:
    """ValueError unless ``value`` is an int (not bool) in ``minimum..2**53-1``."""
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= _MAX_INT:
        raise ValueError(f"{field} must be an integer in {minimum}..{_MAX_INT}, got {value!r}")


def as_enum(field: str, enum: type[_E], value: object) -> _E:
    """``value`` as a member of ``enum``; ValueError naming the field and the allowed values."""
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(member.value) for member in enum)
        raise ValueError(f"{field} {value!r} is not one of {allowed}") from None


def check_protocol(value: object) -> None:
    """ValueError unless ``value`` is the protocol version this code speaks."""
    if type(value) is not int or value != PROTOCOL_VERSION:
        raise ValueError(f"unsupported protocol version {value!r} (this code speaks {PROTOCOL_VERSION})")


def check_nonce(field: str, value: object) -> None:
    """ValueError unless ``value`` is exactly NONCE_BYTES bytes."""
    if not isinstance(value, bytes) or len(value) != NONCE_BYTES:
        raise ValueError(f"{field} must be {NONCE_BYTES} bytes")


class CanonicalRecord:
    """Mixin for frozen dataclasses that travel as canonical JSON.

    ``bytes`` fields named in ``_HEX_FIELDS`` travel as lowercase hex, enums as
    their value. ``__post_init__`` of the dataclass does all validation, so a
    record built from the wire is checked by the same code as one built in memory.
    """

    _HEX_FIELDS: ClassVar[frozenset[str]] = frozenset()
    #: Fields left out of the canonical form when None (added to a record after it shipped: the
    #: records that do not use them keep their bytes, so older readers still parse them).
    _OMITTED_WHEN_NONE: ClassVar[frozenset[str]] = frozenset()
    _WHAT: ClassVar[str] = "record"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (hex for bytes, values for enums)."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.name in self._OMITTED_WHEN_NONE:
                continue
            out[f.name] = value.hex() if isinstance(value, bytes) else value.value if isinstance(value, Enum) else value
        return out

    def to_bytes(self) -> bytes:
        """The canonical byte string of this record (what gets signed)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @classmethod
    def from_bytes(cls: type[_R], raw: bytes | memoryview) -> _R:
        """Parse canonical bytes; MalformedMessageError for anything else."""
        raw = bytes(raw)
        if len(raw) > MAX_HEADER_BYTES:
            raise MalformedMessageError(f"{cls._WHAT}: {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
        try:
            data = json.loads(raw.decode("ascii"), parse_float=_no_float, parse_constant=_no_float)
        except (UnicodeDecodeError, ValueError) as exc:
            raise MalformedMessageError(f"{cls._WHAT}: not ASCII JSON ({exc})") from exc
        except RecursionError as exc:  # thousands of nested brackets still fit in MAX_HEADER_BYTES
            raise MalformedMessageError(f"{cls._WHAT}: JSON nested too deeply") from exc
        if not isinstance(data, dict):
            raise MalformedMessageError(f"{cls._WHAT}: not a JSON object")
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if not names - cls._OMITTED_WHEN_NONE <= set(data) <= names:
            raise MalformedMessageError(f"{cls._WHAT}: keys {sorted(data)} differ from {sorted(names)}")
        try:
            for name in cls._HEX_FIELDS:
                if not isinstance(data[name], str) or data[name] != data[name].lower():
                    raise ValueError(f"{name} must be lowercase hex")
                data[name] = bytes.fromhex(data[name])
            record = cls(**data)
        except (TypeError, ValueError) as exc:
            raise MalformedMessageError(f"{cls._WHAT}: {exc}") from exc
        if record.to_bytes() != raw:
            raise MalformedMessageError(f"{cls._WHAT}: not in canonical form")
        return record


def _no_float(text: str) -> Any:
    raise ValueError(f"non-integer number {text!r}")


_H = TypeVar("_H", bound="MessageHeader")


@dataclass(frozen=True, kw_only=True)
class MessageHeader(CanonicalRecord):
    """Fields every update, aggregate and model message carries.

    ``sender`` is the device id for updates and the aggregator's (or root's) id
    otherwise; ``nonce`` is 16 random bytes naming this message (replay checks,
    receipts); ``timestamp_ms`` is the sender's Unix time in milliseconds.
    """

    _KINDS: ClassVar[frozenset[MessageKind]] = frozenset(MessageKind)
    _HEX_FIELDS: ClassVar[frozenset[str]] = frozenset({"nonce"})

    protocol: int = PROTOCOL_VERSION
    kind: MessageKind
    fleet: str
    sender: str
    round: int
    bundle_version: int
    encoding: Encoding = Encoding.RAW
    nonce: bytes
    timestamp_ms: int

    def __post_init__(self) -> None:
        check_protocol(self.protocol)
        object.__setattr__(self, "kind", as_enum("kind", MessageKind, self.kind))
        object.__setattr__(self, "encoding", as_enum("encoding", Encoding, self.encoding))
        if self.kind not in self._KINDS:
            raise ValueError(f"kind {self.kind.value!r} is not allowed in {type(self).__name__}")
        check_id("fleet", self.fleet)
        check_id("sender", self.sender)
        check_int("round", self.round)
        check_int("bundle_version", self.bundle_version)
        check_nonce("nonce", self.nonce)
        check_int("timestamp_ms", self.timestamp_ms)

    @classmethod
    def create(
        cls: type[_H],
        *,
        clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
        **values: Any,
    ) -> _H:
        """A header with a fresh random nonce and the current time; ``values`` are the other fields."""
        return cls(nonce=random_bytes(NONCE_BYTES), timestamp_ms=int(clock() * 1000), **values)


@dataclass(frozen=True, kw_only=True)
class UpdateHeader(MessageHeader):
    """Header of a sealed update: a device's delta (``update``) or a region's sum (``aggregate``).

    ``sample_count`` is the number of training examples behind the tensors.
    """

    _KINDS: ClassVar[frozenset[MessageKind]] = frozenset({MessageKind.UPDATE, MessageKind.AGGREGATE})
    _WHAT: ClassVar[str] = "update header"

    kind: MessageKind = MessageKind.UPDATE
    region: str
    sample_count: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_id("region", self.region)
        check_int("sample_count", self.sample_count)


@dataclass(frozen=True, kw_only=True)
class ModelHeader(MessageHeader):
    """Header of a signed model going down. ``region`` None: the root's global model."""

    _KINDS: ClassVar[frozenset[MessageKind]] = frozenset({MessageKind.MODEL})
    _WHAT: ClassVar[str] = "model header"

    kind: MessageKind = MessageKind.MODEL
    region: str | None = None
    #: The uplink compression the publisher asks for this round (CompressionSpec text); None (left out of
    #: the canonical form): the bundle's ``compression`` field decides, as before this field existed.
    compression: str | None = None
    #: The frame versions the publisher opens in the updates (or aggregates) it is sent, ascending
    #: (docs/protocol.md, "Frames"); None (left out): version 1 only, as before this field existed.
    frames: tuple[int, ...] | None = None
    _OMITTED_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"compression", "frames"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_id("region", self.region, optional=True)
        if self.compression is not None and CompressionSpec.parse(self.compression).describe() != self.compression:
            raise ValueError(f"compression {self.compression!r} is not in its canonical text form")
        if self.frames is not None:
            frames = self.frames
            if (not isinstance(frames, (list, tuple)) or not 1 <= len(frames) <= 8
                    or any(type(v) is not int or not 1 <= v <= 255 for v in frames) or list(frames) != sorted(set(frames))):
                raise ValueError(f"frames must be 1 to 8 distinct frame versions (1..255) in ascending order, got {frames!r}")
            object.__setattr__(self, "frames", tuple(frames))


@dataclass(frozen=True, kw_only=True)
class ModelDeltaHeader(ModelHeader):
    """Header of a signed model delta (``FDGD``): the tensors are what to add to the model of ``base_round``
    whose digest is ``base_digest``; ``digest`` is the digest of the model the sum makes (docs/protocol.md,
    "Models down as compressed deltas")."""

    _HEX_FIELDS: ClassVar[frozenset[str]] = frozenset({"nonce", "base_digest", "digest"})
    _WHAT: ClassVar[str] = "model delta header"

    base_round: int
    base_digest: bytes
    digest: bytes

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("base_round", self.base_round)
        if self.base_round >= self.round:
            raise ValueError(f"base_round {self.base_round} must be before round {self.round}")
        for name in ("base_digest", "digest"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != DIGEST_BYTES:
                raise ValueError(f"{name} must be {DIGEST_BYTES} bytes")


def check_peer_ids(field: str, value: object, *, limit: int = MAX_CANDIDATES) -> tuple[str, ...]:
    """``value`` (a list or tuple of distinct valid ids, at most ``limit``) as a tuple; ValueError otherwise."""
    if not isinstance(value, (list, tuple)) or len(value) > limit:
        raise ValueError(f"{field} must be a list of at most {limit} ids")
    for item in value:
        check_id(f"{field} entry", item)
    if len(set(value)) != len(value):
        raise ValueError(f"{field} holds an id twice")
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class CandidatesHeader(MessageHeader):
    """Header of FedFomo candidate models sealed by a region to one device.

    ``recipient``: the device; ``request_nonce``: the nonce of the request
    answered; ``peers[i]`` trained ``peer_rounds[i]``'s model, whose tensors
    travel as ``"<i>/<name>"``. Empty ``peers``: the pool had nothing to serve.
    """

    _KINDS: ClassVar[frozenset[MessageKind]] = frozenset({MessageKind.CANDIDATES})
    _HEX_FIELDS: ClassVar[frozenset[str]] = frozenset({"nonce", "request_nonce"})
    _WHAT: ClassVar[str] = "candidates header"

    kind: MessageKind = MessageKind.CANDIDATES
    region: str
    recipient: str
    request_nonce: bytes
    peers: tuple[str, ...] = ()
    peer_rounds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_id("region", self.region)
        check_id("recipient", self.recipient)
        check_nonce("request_nonce", self.request_nonce)
        object.__setattr__(self, "peers", check_peer_ids("peers", self.peers))
        if not isinstance(self.peer_rounds, (list, tuple)) or len(self.peer_rounds) != len(self.peers):
            raise ValueError("peer_rounds must list one round per peer")
        for r in self.peer_rounds:
            check_int("peer_rounds entry", r)
        object.__setattr__(self, "peer_rounds", tuple(self.peer_rounds))
        if self.recipient in self.peers:
            raise ValueError("a device is never served its own model")
