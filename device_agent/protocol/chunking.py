"""Splitting messages that exceed the broker's size limit, and putting them back together.

Why: paho-mqtt 2.2 ignores the broker's maximum packet size. An oversized
publish gets the client disconnected and auto-reconnect resends it forever
(the same happens with Mosquitto's ``message_size_limit`` on MQTT v5). So a
sender checks every payload against the known limit before publishing and
either chunks it (:func:`frames_for_publish`) or refuses it
(:func:`check_publish_size`).

Chunk layout (little-endian)::

    b"FDGC" | version u8 | message_id 16 | index u32 | count u32 | total_length u64 | sha256 of whole 32 | data

The SHA-256 detects corruption and mix-ups only; authenticity comes from the
envelope inside, which the receiver opens after reassembly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from device_agent.errors import FedgeError, MalformedMessageError
from device_agent.protocol._reader import ByteReader, pack_u8, pack_u32, pack_u64

logger = logging.getLogger(__name__)

CHUNK_MAGIC = b"FDGC"
CHUNK_VERSION = 1
MESSAGE_ID_BYTES = 16
CHUNK_HEADER_BYTES = 4 + 1 + MESSAGE_ID_BYTES + 4 + 4 + 8 + 32
#: Bytes an MQTT PUBLISH adds besides topic and payload: fixed header (1),
#: remaining length (<= 4), topic length (2), packet id (2), v5 property
#: length (1), rounded up for headroom.
PUBLISH_OVERHEAD = 16


class PayloadTooLargeError(FedgeError):
    """A payload does not fit under the broker's size limit and must not be published as is."""


def check_publish_size(payload_len: int, broker_limit: int, *, topic: str = "") -> None:
    """PayloadTooLargeError unless a PUBLISH of ``payload_len`` bytes to ``topic`` fits in ``broker_limit``.

    ``broker_limit`` is the broker's maximum packet size (or ``message_size_limit``);
    the check counts the packet overhead conservatively.
    """
    size = payload_len + len(topic.encode("utf-8")) + PUBLISH_OVERHEAD
    if size > broker_limit:
        raise PayloadTooLargeError(
            f"a {payload_len}-byte payload makes a {size}-byte PUBLISH, over the broker limit of {broker_limit}; "
            "paho-mqtt would be disconnected and resend it forever: chunk it (frames_for_publish) or refuse it"
        )


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """One parsed chunk frame: part ``index`` of ``count`` of message ``message_id``."""

    message_id: bytes
    index: int
    count: int
    total_length: int
    digest: bytes
    data: bytes


def split_message(
    blob: bytes,
    *,
    max_frame_bytes: int,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> list[bytes]:
    """Chunk frames of at most ``max_frame_bytes`` each (header included) carrying ``blob`` in order."""
    room = max_frame_bytes - CHUNK_HEADER_BYTES
    if room < 1:
        raise ValueError(f"max_frame_bytes must exceed the {CHUNK_HEADER_BYTES}-byte chunk header")
    count = max(1, -(-len(blob) // room))
    if count > 0xFFFFFFFF:
        raise ValueError("message too large to chunk at this frame size")
    message_id = random_bytes(MESSAGE_ID_BYTES)
    if len(message_id) != MESSAGE_ID_BYTES:
        raise ValueError(f"random_bytes must return {MESSAGE_ID_BYTES} bytes")
    head = CHUNK_MAGIC + pack_u8(CHUNK_VERSION) + message_id
    tail = pack_u32(count) + pack_u64(len(blob)) + hashlib.sha256(blob).digest()
    return [head + pack_u32(i) + tail + blob[i * room : (i + 1) * room] for i in range(count)]


def frames_for_publish(
    blob: bytes,
    *,
    broker_limit: int,
    topic: str = "",
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> list[bytes]:
    """``[blob]`` when it fits under the broker limit, otherwise its chunk frames, each of which fits."""
    budget = broker_limit - PUBLISH_OVERHEAD - len(topic.encode("utf-8"))
    if len(blob) <= budget:
        return [blob]
    return split_message(blob, max_frame_bytes=budget, random_bytes=random_bytes)


def is_chunk(payload: bytes) -> bool:
    """True when ``payload`` starts like a chunk frame (so it goes to a Reassembler)."""
    return payload[:4] == CHUNK_MAGIC


def parse_chunk(frame: bytes | bytearray | memoryview) -> Chunk:
    """Parse one chunk frame; MalformedMessageError when its structure is off."""
    reader = ByteReader(frame, what="chunk")
    reader.expect(CHUNK_MAGIC, "magic")
    if (version := reader.u8("version")) != CHUNK_VERSION:
        raise MalformedMessageError(f"chunk: unsupported version {version}")
    message_id = bytes(reader.take(MESSAGE_ID_BYTES, "message id"))
    index, count, total = reader.u32("index"), reader.u32("count"), reader.u64("total length")
    digest = bytes(reader.take(32, "digest"))
    data = bytes(reader.take(reader.remaining, "data"))
    if not index < count:
        raise MalformedMessageError(f"chunk: index {index} not below count {count}")
    if len(data) > total:
        raise MalformedMessageError(f"chunk: {len(data)} data bytes exceed the message length {total}")
    return Chunk(message_id=message_id, index=index, count=count, total_length=total, digest=digest, data=data)


@dataclass(kw_only=True)
class _Partial:
    count: int
    total_length: int
    digest: bytes
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0


class Reassembler:
    """Collects chunk frames into whole messages in bounded memory.

    Messages are keyed by (sender, message id), where ``sender`` comes from
    the topic, so one device cannot disturb another's chunks. At most
    ``max_messages`` are in flight and their declared lengths together stay
    within ``max_total_bytes``: a new message evicts the oldest when needed.
    Messages not finished within ``timeout_s`` of their first chunk are
    dropped. Exact duplicate chunks are ignored; a chunk that contradicts
    earlier ones drops its message with MalformedMessageError. Not thread-safe.
    """

    def __init__(
        self,
        *,
        max_messages: int = 16,
        max_total_bytes: int = 64 << 20,
        max_chunks: int = 1 << 16,
        timeout_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        remember_completed: int = 1024,
    ) -> None:
        if min(max_messages, max_total_bytes, max_chunks, remember_completed) < 1 or timeout_s <= 0:
            raise ValueError("reassembly limits must be positive")
        self.max_messages = max_messages
        self.max_total_bytes = max_total_bytes
        self.max_chunks = max_chunks
        self.timeout_s = timeout_s
        self._clock = clock
        self._remember = remember_completed
        self._pending: OrderedDict[tuple[str, bytes], _Partial] = OrderedDict()
        self._completed: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self.dropped = 0

    @property
    def in_flight(self) -> int:
        """Messages with some but not all chunks received."""
        return len(self._pending)

    @property
    def reserved_bytes(self) -> int:
        """Sum of the declared lengths of the messages in flight."""
        return sum(p.total_length for p in self._pending.values())

    def expire(self) -> int:
        """Drop messages older than ``timeout_s``; returns how many were dropped."""
        deadline = self._clock() - self.timeout_s
        stale = [key for key, p in self._pending.items() if p.started < deadline]
        for key in stale:
            self._drop(key, "timed out")
        return len(stale)

    def _drop(self, key: tuple[str, bytes], why: str) -> None:
        partial = self._pending.pop(key)
        self.dropped += 1
        logger.warning("dropping chunked message %s from %r (%d/%d chunks): %s", key[1].hex(), key[0], len(partial.parts), partial.count, why)

    def add(self, frame: bytes | bytearray | memoryview, *, sender: str = "") -> bytes | None:
        """Take one chunk frame; the whole message once its last chunk arrives, else None.

        MalformedMessageError for a bad frame, a message over the limits, a
        chunk contradicting earlier ones, or a reassembled message whose
        length or SHA-256 does not match.
        """
        self.expire()
        chunk = parse_chunk(frame)
        key = (sender, chunk.message_id)
        if key in self._completed:
            return None
        if chunk.total_length > self.max_total_bytes or chunk.count > self.max_chunks:
            raise MalformedMessageError(
                f"chunked message of {chunk.total_length} bytes in {chunk.count} chunks exceeds the reassembly limits"
            )
        partial = self._pending.get(key)
        if partial is None:
            partial = self._start(key, chunk)
        if (partial.count, partial.total_length, partial.digest) != (chunk.count, chunk.total_length, chunk.digest):
            self._drop(key, "inconsistent chunk")
            raise MalformedMessageError("chunk disagrees with earlier chunks of its message (count, length or digest)")
        if chunk.index in partial.parts:
            if partial.parts[chunk.index] == chunk.data:
                return None
            self._drop(key, "conflicting duplicate")
            raise MalformedMessageError(f"chunk {chunk.index} arrived twice with different data")
        if partial.received + len(chunk.data) > partial.total_length:
            self._drop(key, "too much data")
            raise MalformedMessageError("chunks carry more data than the declared message length")
        partial.parts[chunk.index] = chunk.data
        partial.received += len(chunk.data)
        if len(partial.parts) < partial.count:
            return None
        del self._pending[key]
        blob = b"".join(partial.parts[i] for i in range(partial.count))
        if len(blob) != partial.total_length or hashlib.sha256(blob).digest() != partial.digest:
            self.dropped += 1
            raise MalformedMessageError("reassembled message fails its length or SHA-256 check")
        self._completed[key] = None
        if len(self._completed) > self._remember:
            self._completed.popitem(last=False)
        return blob

    def _start(self, key: tuple[str, bytes], chunk: Chunk) -> _Partial:
        while self._pending and (
            len(self._pending) >= self.max_messages or self.reserved_bytes + chunk.total_length > self.max_total_bytes
        ):
            self._drop(next(iter(self._pending)), "evicted to make room")
        partial = _Partial(count=chunk.count, total_length=chunk.total_length, digest=chunk.digest, started=self._clock())
        self._pending[key] = partial
        return partial
