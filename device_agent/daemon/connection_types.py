"""The value types of the device's MQTT connection: states, tickets, messages and the events callbacks enqueue.

:mod:`device_agent.daemon.connection` re-exports the public ones.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar, Union

logger = logging.getLogger("device_agent.daemon.connection")


class MqttProtocol(str, Enum):
    """Which MQTT version to speak: MQTT 5 with a fall back to 3.1.1 (``auto``), or one of them only."""

    AUTO = "auto"
    V5 = "5"
    V311 = "3.1.1"


class ConnectionState(str, Enum):
    """Where the connection is: no socket, CONNECT sent and CONNACK awaited, or accepted by the broker."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"


@dataclass(frozen=True, kw_only=True)
class InboundMessage:
    """A message the broker delivered; ``retained`` is set for a retained message replayed on subscribe."""

    topic: str
    payload: bytes
    retained: bool


@dataclass(frozen=True)
class _ConnAck:
    accepted: bool
    reason: str
    code: int
    session_present: bool
    max_packet_size: int | None


@dataclass(frozen=True)
class _Lost:
    reason: str
    code: int


@dataclass(frozen=True)
class _SubAck:
    refused: tuple[str, ...]


@dataclass(frozen=True)
class _Published:
    mid: int
    refused: str


_Event = Union[_ConnAck, _Lost, _SubAck, _Published]


class PublishTicket:
    """What :meth:`MqttConnection.publish_checked` queued: ``frames`` PUBLISH packets for one payload.

    ``chunked`` is True when the payload went out as chunk frames.
    """

    def __init__(self, topic: str, frames: list[bytes], *, qos: int, retain: bool, payload: bytes | None = None) -> None:
        self.topic = topic
        self.payload = b"".join(frames) if payload is None else payload
        self.payloads = frames
        #: Why the connection dropped this publish without sending it (the limit fell below a frame), else empty.
        self.dropped = ""
        self.qos = qos
        self.retain = retain
        self._unacknowledged: set[int] = set()
        self._acknowledged = threading.Event()

    @property
    def frames(self) -> int:
        """How many PUBLISH packets carry the payload (1 unless chunked)."""
        return len(self.payloads)

    @property
    def chunked(self) -> bool:
        """Whether the payload was split into chunk frames."""
        return len(self.payloads) > 1

    def acknowledged(self) -> bool:
        """True once the broker acknowledged every frame (QoS 0: once they were written).

        A publish made while disconnected waits in paho's queue and is acknowledged after the next connect.
        """
        return self._acknowledged.is_set()

    def _handed(self, mids: list[int]) -> None:
        self._unacknowledged.update(mids)
        if not self._unacknowledged:
            self._acknowledged.set()

    def _confirm(self, mid: int) -> None:
        self._unacknowledged.discard(mid)
        if not self._unacknowledged:
            self._acknowledged.set()


_T = TypeVar("_T")


def drain(source: queue.Queue[_T]) -> Iterator[_T]:
    """The items already in ``source``, taken without blocking."""
    while True:
        try:
            yield source.get_nowait()
        except queue.Empty:
            return


def _guarded(name: str, body: Callable[..., None]) -> Callable[..., None]:
    """A paho callback that never raises: paho would otherwise swallow or re-raise it in its own loop."""

    def callback(*args: Any) -> None:
        try:
            body(*args)
        except Exception:  # noqa: BLE001 - a callback must not kill the network loop
            logger.exception("MQTT %s callback failed", name)

    return callback
