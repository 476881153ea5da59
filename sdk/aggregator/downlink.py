"""What a device-serving tier publishes for a round: the full model devices fall back to, and the delta.

:class:`DownlinkSettings` (the ``[downlink]`` table of a regional service, or ``fedge aggregator regional
--downlink-compression / --uplink-compression``) turns on two things, both off by default:

- ``compression``: the model goes down as a compressed delta from the previous published model on
  ``model/delta`` (retained), with error feedback on the publisher's side (:class:`~device_agent.compression.downlink.DeltaChain`).
  The full model on ``model/global`` (retained) is then the model the devices reconstruct, so a device that
  falls back to it holds the very base of the next delta and rejoins.
- ``uplink``: the compression devices use for their update, round by round (:class:`UplinkSchedule`), carried
  in the model and delta headers (``compression``) and overriding the bundle's ``compression`` field.

The round's stored model (the aggregator's true model, the base its deltas are added to) is not changed; the
publisher re-signs with the tier's key what it publishes. With a ``state`` file (``<store>.downlink`` for the
service) it writes what it is about to publish there first (write-temp, fsync, rename), and a restarted
publisher picks the chain up from it: the same messages again for the same round, a delta from it for the
next; without one (or when the file does not verify) the first round after a restart goes out in full and
the chain starts again (docs/protocol.md, "Models down as compressed deltas").
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.compression.downlink import DeltaChain, HeldModel
from device_agent.compression.spec import NO_COMPRESSION, CompressionSpec
from device_agent.protocol.envelope import open_model, sign_model
from device_agent.protocol.headers import ModelDeltaHeader, ModelHeader
from device_agent.errors import FedgeError
from device_agent.protocol.model_delta import open_model_delta, sign_model_delta
from device_agent.state_store import atomic_write_bytes

logger = logging.getLogger(__name__)
_STATE_MAGIC = b"FDDS"


@dataclass(frozen=True, kw_only=True)
class UplinkSchedule:
    """The uplink compression by round: ``steps`` are (first round, spec) in ascending order; before the first
    step (or with none) the bundle decides. Text form: ``q8`` (from round 0 on) or ``0:q8,10:topk:0.3+q4``."""

    steps: tuple[tuple[int, CompressionSpec], ...] = ()

    def __post_init__(self) -> None:
        rounds = [r for r, _ in self.steps]
        if any(r < 0 for r in rounds) or rounds != sorted(set(rounds)):
            raise ValueError("uplink schedule rounds must be distinct, ascending and >= 0")

    def for_round(self, round: int) -> CompressionSpec | None:
        """The spec for ``round`` (None: no override, the bundle's field decides)."""
        chosen = None
        for first, spec in self.steps:
            if first <= round:
                chosen = spec
        return chosen

    @classmethod
    def parse(cls, text: str) -> UplinkSchedule:
        """From the text form; ValueError naming what is wrong."""
        steps: list[tuple[int, CompressionSpec]] = []
        for part in (p.strip() for p in text.split(",")):
            head, sep, rest = part.partition(":")
            if sep and head.strip().isdigit():
                steps.append((int(head), CompressionSpec.parse(rest)))
            else:
                steps.append((0, CompressionSpec.parse(part)))
        return cls(steps=tuple(steps))

    def describe(self) -> str:
        """The text form."""
        return ",".join(f"{r}:{spec.describe()}" for r, spec in self.steps)


@dataclass(frozen=True, kw_only=True)
class DownlinkSettings:
    """``compression``: of the model deltas going down (``none``: full models only, the default);
    ``uplink``: the round-by-round uplink override (empty: the bundle decides)."""

    compression: CompressionSpec = NO_COMPRESSION
    uplink: UplinkSchedule = field(default_factory=UplinkSchedule)

    @property
    def active(self) -> bool:
        """False: the stored model goes out as it is (byte for byte what it was before this existed)."""
        return self.compression.enabled or bool(self.uplink.steps)


@dataclass(frozen=True, kw_only=True)
class Published:
    """What to publish for a round: ``full`` on ``model/global``, ``delta`` on ``model/delta`` (None: clear it)."""

    round: int
    full: bytes
    delta: bytes | None


class ModelPublisher:
    """Turns the tier's stored signed model of a round into what its devices get (module docstring)."""

    def __init__(self, settings: DownlinkSettings, *, signing_key: Ed25519PrivateKey,
                 clock: Callable[[], float] = time.time, state: Path | None = None) -> None:
        self.settings = settings
        self._key = signing_key
        self._clock = clock
        self._chain = DeltaChain(settings.compression) if settings.compression.enabled else None
        self._version: int | None = None
        self._last: tuple[bytes, Published] | None = None
        self._last_source: bytes | None = None  # from the state file: the stored model its messages were made from
        self._resumed: Published | None = None  # ... and those messages
        self._state = state if self._chain is not None else None
        #: Bytes of the last full model and delta published (for the benchmarks and metrics).
        self.last_sizes: tuple[int, int | None] | None = None
        if self._state is not None:
            self._resume(self._state)

    def held_model(self) -> HeldModel | None:
        """The model devices that applied every delta hold (None without deltas or before the first model)."""
        return None if self._chain is None else self._chain.held

    def prepare(self, blob: bytes) -> Published:
        """What to publish for the stored model ``blob`` (signed by this tier); the same answer for the same blob."""
        if self._last is not None and self._last[0] == blob:
            return self._last[1]
        if self._last is None and self._last_source == hashlib.sha256(blob).digest() and self._resumed is not None:
            return self._remember(blob, self._resumed)  # restarted: what went out for this round, again
        opened = open_model(blob, trusted_signers=self._key.public_key())
        h = opened.header
        if not self.settings.active:
            return self._remember(blob, Published(round=h.round, full=blob, delta=None))
        uplink = self.settings.uplink.for_round(h.round)
        fields = dict(fleet=h.fleet, sender=h.sender, round=h.round, bundle_version=h.bundle_version, region=h.region, frames=h.frames,
                      compression=None if uplink is None else uplink.describe(), clock=self._clock)
        tensors, delta = opened.tensors, None
        if self._chain is not None:
            if self._version != h.bundle_version:
                self._chain.held = None  # another bundle: its first model goes out in full
                self._version = h.bundle_version
            step = self._chain.advance(h.round, tensors)
            held = self._chain.held
            assert held is not None
            tensors = held.tensors
            if step is None:
                logger.info("round %d: full model only (the delta chain starts here)", h.round)
            else:
                header = ModelDeltaHeader.create(**fields, encoding=step.encoding, base_round=step.base.round,
                                                 base_digest=step.base.digest, digest=step.result.digest)
                delta = sign_model_delta(header, step.tensors, signer_key=self._key)
        full = sign_model(ModelHeader.create(**fields), tensors, signer_key=self._key)
        return self._remember(blob, Published(round=h.round, full=full, delta=delta))

    def _resume(self, path: Path) -> None:
        """Pick the chain up from the state file (one WARNING line and a fresh start when it does not verify)."""
        if not path.exists():
            return
        try:
            data = path.read_bytes()
            if data[:4] != _STATE_MAGIC or len(data) < 4 + 32 + 16:
                raise ValueError("not a downlink state file")
            source = data[4:36]
            (full_len,) = struct.unpack_from("<Q", data, 36)
            full = data[44:44 + full_len]
            (delta_len,) = struct.unpack_from("<Q", data, 44 + full_len)
            delta = data[52 + full_len:52 + full_len + delta_len]
            if len(data) != 52 + full_len + delta_len:
                raise ValueError("truncated or trailing bytes")
            opened = open_model(full, trusted_signers=self._key.public_key())
            if delta:
                open_model_delta(delta, trusted_signers=self._key.public_key())
        except (OSError, ValueError, struct.error, FedgeError) as exc:
            logger.warning("downlink state %s not used (%s): the next model goes out in full", path, exc)
            return
        assert self._chain is not None
        self._chain.held = HeldModel.of(opened.header.round, opened.tensors)
        self._version = opened.header.bundle_version
        self._last_source = source
        self._resumed = Published(round=opened.header.round, full=full, delta=delta or None)
        logger.info("downlink: the delta chain resumes at round %d", opened.header.round)

    def _remember(self, blob: bytes, published: Published) -> Published:
        if self._state is not None and (self._last is None or self._last[1] is not published):
            delta = published.delta or b""
            atomic_write_bytes(self._state, _STATE_MAGIC + hashlib.sha256(blob).digest() + struct.pack("<Q", len(published.full))
                               + published.full + struct.pack("<Q", len(delta)) + delta)
        self._last = (blob, published)
        self.last_sizes = (len(published.full), None if published.delta is None else len(published.delta))
        return published
