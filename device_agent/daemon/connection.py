"""The device's MQTT connection: one thread owns the paho client, callbacks only enqueue.

Shape (paho-mqtt 2.x, callback API version 2, MQTT v3.1.1):

- A persistent session (``clean_session`` false) under a stable client id
  (the device id), so QoS 1 receipts sent while the device is offline wait
  at the broker.
- A last will on the device's presence topic (retained ``offline``); every
  successful connect publishes retained ``online``, a clean :meth:`MqttConnection.close`
  publishes ``offline`` itself (a clean DISCONNECT cancels the will).
- paho's own reconnect is off. The network thread started by :meth:`MqttConnection.start`
  is the only code that touches the client: it runs ``client.loop()``,
  drains the events the callbacks queued, tracks :class:`ConnectionState`,
  reconnects after a capped, jittered exponential backoff that resets on a
  successful CONNACK, (re)subscribes on every connect, and performs the
  publishes other threads asked for. Callbacks do nothing but ``put`` on a
  :class:`queue.Queue`; incoming messages go to :attr:`MqttConnection.inbox`
  for the agent's own loop. Why not ``loop_start()``: with paho's reconnect
  off its thread ends at the first drop, and outside that mode
  ``publish()`` from another thread writes to the socket directly, racing
  the loop; one owning thread avoids both.
- :meth:`MqttConnection.publish_checked` sizes every payload against the
  broker limit *before* anything reaches paho, which ignores the broker's
  maximum packet size: an oversized PUBLISH would get the client
  disconnected and paho would resend it after every reconnect, forever.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar, Union

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.daemon.backoff import Backoff, BackoffPolicy
from device_agent.daemon.config import BrokerConfig, OversizePolicy
from device_agent.protocol.chunking import check_publish_size, frames_for_publish

logger = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"


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
    session_present: bool


@dataclass(frozen=True)
class _Lost:
    reason: str


@dataclass(frozen=True)
class _SubAck:
    refused: tuple[str, ...]


@dataclass(frozen=True)
class _Published:
    mid: int


_Event = Union[_ConnAck, _Lost, _SubAck, _Published]


class PublishTicket:
    """What :meth:`MqttConnection.publish_checked` queued: ``frames`` PUBLISH packets for one payload.

    ``chunked`` is True when the payload went out as chunk frames.
    """

    def __init__(self, topic: str, frames: list[bytes], *, qos: int, retain: bool) -> None:
        self.topic = topic
        self.payloads = frames
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


class MqttConnection:
    """A managed connection to the regional broker for one device.

    ``subscriptions`` are (re)subscribed at QoS 1 on every connect. ``clock``
    (monotonic seconds) and ``rng`` (backoff jitter) are injectable;
    ``poll_interval_s`` bounds how long a publish waits for the network thread.
    """

    def __init__(
        self,
        broker: BrokerConfig,
        *,
        client_id: str,
        presence_topic: str,
        subscriptions: Sequence[str],
        backoff: BackoffPolicy = BackoffPolicy(),
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        poll_interval_s: float = 0.05,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be > 0")
        self.broker = broker
        self.client_id = client_id
        self.presence_topic = presence_topic
        self.subscriptions = tuple(subscriptions)
        self.inbox: queue.Queue[InboundMessage] = queue.Queue()
        #: Successful connections so far (CONNACK accepted); a reconnect makes it 2.
        self.connects = 0
        self._backoff = Backoff(backoff, rng=rng)
        self._clock = clock
        self._poll = poll_interval_s
        self._events: queue.Queue[_Event] = queue.Queue()
        self._commands: queue.Queue[PublishTicket] = queue.Queue()
        self._in_flight: dict[int, PublishTicket] = {}
        self._state = ConnectionState.DISCONNECTED
        self._state_changed = threading.Condition()
        self._next_attempt = 0.0
        self._connack_deadline = 0.0
        self._closing = threading.Event()
        self._graceful = True
        self._thread: threading.Thread | None = None
        self._client = self._make_client()

    # -- public surface -------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The current :class:`ConnectionState`."""
        return self._state

    def start(self) -> None:
        """Start the network thread; it connects (and keeps reconnecting) in the background."""
        if self._thread is not None or self._closing.is_set():
            raise RuntimeError("connection already started (or closed: make a new one)")
        self._thread = threading.Thread(target=self._serve, name=f"fedge-mqtt-{self.client_id}", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for CONNECTED; whether it is connected at the end."""
        deadline = self._clock() + timeout
        with self._state_changed:
            while self._state is not ConnectionState.CONNECTED:
                left = deadline - self._clock()
                if left <= 0 or self._closing.is_set():
                    return False
                self._state_changed.wait(min(left, 0.1))
        return True

    def publish_checked(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> PublishTicket:
        """Queue ``payload`` for ``topic`` after checking it against ``broker.max_packet_size``.

        An oversized payload is split into chunk frames that each fit
        (``oversized = "chunk"``) or refused with PayloadTooLargeError
        (``"refuse"``, and always for retained messages, which chunking
        cannot carry); nothing reaches paho either way. While disconnected,
        QoS 1 publishes wait in paho's queue and go out after the next connect.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        payload = bytes(payload)
        limit = self.broker.max_packet_size
        if retain or self.broker.oversized is OversizePolicy.REFUSE:
            check_publish_size(len(payload), limit, topic=topic)
            frames = [payload]
        else:
            frames = frames_for_publish(payload, broker_limit=limit, topic=topic)
        for frame in frames:  # belt and braces: no frame may reach paho unchecked
            check_publish_size(len(frame), limit, topic=topic)
        ticket = PublishTicket(topic, frames, qos=qos, retain=retain)
        if len(frames) > 1:
            logger.info("payload of %d bytes for %s goes out as %d chunk frames", len(payload), topic, len(frames))
        self._commands.put(ticket)
        return ticket

    def close(self, *, graceful: bool = True, timeout: float = 5.0) -> None:
        """Stop the network thread. ``graceful``: publish ``offline`` and DISCONNECT; else drop the socket (the will fires)."""
        self._graceful = graceful
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- paho client and its callbacks (enqueue only) --------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        client.will_set(self.presence_topic, OFFLINE, qos=1, retain=True)
        client.username_pw_set(self.broker.username or self.client_id, self.broker.read_password())
        tls = self.broker.tls
        if tls is not None:
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.connect_timeout = self.broker.connect_timeout_s
        events = self._events
        client.on_connect = _guarded("connect", lambda c, u, flags, rc, props: events.put(
            _ConnAck(accepted=not rc.is_failure, reason=str(rc), session_present=bool(flags.session_present))))
        client.on_disconnect = _guarded("disconnect", lambda c, u, flags, rc, props: events.put(_Lost(reason=str(rc))))
        client.on_subscribe = _guarded("subscribe", lambda c, u, mid, rcs, props: events.put(
            _SubAck(refused=tuple(str(rc) for rc in rcs if rc.is_failure))))
        client.on_publish = _guarded("publish", lambda c, u, mid, rc, props: events.put(_Published(mid=mid)))
        inbox = self.inbox
        client.on_message = _guarded("message", lambda c, u, msg: inbox.put(
            InboundMessage(topic=msg.topic, payload=bytes(msg.payload), retained=bool(msg.retain))))
        return client

    # -- the network thread ---------------------------------------------------------------

    def _set_state(self, state: ConnectionState) -> None:
        with self._state_changed:
            self._state = state
            self._state_changed.notify_all()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the network thread must outlive any single failure
                logger.exception("MQTT network loop error; dropping the connection")
                self._mark_down("network loop error")
        try:
            self._goodbye()
        except Exception:  # noqa: BLE001
            logger.exception("error while closing the MQTT connection")
        self._set_state(ConnectionState.DISCONNECTED)

    def _step(self) -> None:
        self._drain_events()
        self._run_commands()
        if self._state is ConnectionState.DISCONNECTED:
            wait = self._next_attempt - self._clock()
            if wait > 0:
                self._closing.wait(min(wait, self._poll))
                return
            self._attempt()
            return
        if self._state is ConnectionState.CONNECTING and self._clock() > self._connack_deadline:
            self._mark_down(f"no CONNACK within {self.broker.connect_timeout_s} s")
            return
        rc = self._client.loop(timeout=self._poll)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._drain_events()  # the on_disconnect event, when paho raised one, names the reason
            self._mark_down(mqtt.error_string(rc))

    def _attempt(self) -> None:
        self._set_state(ConnectionState.CONNECTING)
        self._connack_deadline = self._clock() + self.broker.connect_timeout_s
        try:
            self._client.connect(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s)
        except (OSError, ValueError) as exc:  # ssl.SSLError and socket timeouts are OSErrors
            self._mark_down(f"connect to {self.broker.host}:{self.broker.port} failed: {exc}")

    def _mark_down(self, reason: str) -> None:
        if self._state is ConnectionState.DISCONNECTED:
            return
        was_up = self._state is ConnectionState.CONNECTED
        self._set_state(ConnectionState.DISCONNECTED)
        delay = self._backoff.next_delay()
        self._next_attempt = self._clock() + delay
        log = logger.warning if was_up else logger.info
        log("MQTT %s (%s); next attempt in %.2f s", "connection lost" if was_up else "connect failed", reason, delay)

    def _drain_events(self) -> None:
        for event in drain(self._events):
            if isinstance(event, _ConnAck):
                self._on_connack(event)
            elif isinstance(event, _Lost):
                self._mark_down(event.reason)
            elif isinstance(event, _Published):
                ticket = self._in_flight.pop(event.mid, None)
                if ticket is not None:
                    ticket._confirm(event.mid)
            elif event.refused:
                logger.error("broker refused subscriptions of %s: %s", self.client_id, ", ".join(event.refused))

    def _on_connack(self, event: _ConnAck) -> None:
        if not event.accepted:
            logger.error("broker refused the connection of %s: %s", self.client_id, event.reason)
            self._mark_down(f"CONNACK {event.reason}")
            return
        self._backoff.reset()
        self.connects += 1
        self._set_state(ConnectionState.CONNECTED)
        logger.info("MQTT connected to %s:%d as %s (session present: %s)",
                    self.broker.host, self.broker.port, self.client_id, event.session_present)
        # Subscribe every time: a broker that lost its persistence lost the subscriptions too.
        if self.subscriptions:
            self._client.subscribe([(topic, 1) for topic in self.subscriptions])
        self._client.publish(self.presence_topic, ONLINE, qos=1, retain=True)

    def _run_commands(self) -> None:
        for ticket in drain(self._commands):
            mids = [self._client.publish(ticket.topic, frame, qos=ticket.qos, retain=ticket.retain).mid
                    for frame in ticket.payloads]
            self._in_flight.update((mid, ticket) for mid in mids)
            ticket._handed(mids)

    def _goodbye(self) -> None:
        self._run_commands()
        if self._state is not ConnectionState.CONNECTED or not self._graceful:
            sock = self._client.socket()
            if sock is not None:
                sock.close()  # no DISCONNECT: the broker publishes the will
            return
        info = self._client.publish(self.presence_topic, OFFLINE, qos=1, retain=True)
        deadline = self._clock() + min(2.0, self.broker.connect_timeout_s)
        while not info.is_published() and self._clock() < deadline:
            if self._client.loop(timeout=self._poll) != mqtt.MQTT_ERR_SUCCESS:
                break
        self._client.disconnect()
        self._client.loop(timeout=self._poll)
