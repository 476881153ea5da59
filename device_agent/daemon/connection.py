"""The device's MQTT connection: one thread owns the paho client, callbacks only enqueue.

Shape (paho-mqtt 2.x, callback API version 2):

- **Protocol.** MQTT 5 first (the broker's CONNACK then says how large a packet
  it accepts, and a broker that drops the client says why); a broker that
  answers "unsupported protocol version" (amqtt, old brokers) gets MQTT 3.1.1
  from then on. :class:`MqttProtocol` pins either one.
- A persistent session (``clean_session`` false in 3.1.1; ``clean_start``
  false and a session that never expires in 5) under a stable client id
  (the device id), so QoS 1 receipts sent while the device is offline wait
  at the broker.
- A last will on the device's presence topic (retained ``offline``); every
  successful connect publishes retained ``online``, a clean :meth:`MqttConnection.close`
  publishes ``offline`` itself (a clean DISCONNECT cancels the will). The agent
  passes its status topic and payload makers instead: a freshly signed
  status on every connect and on :meth:`MqttConnection.refresh_presence`, a
  signed offline status (made before each connect attempt) as the will.
- paho's own reconnect is off. The network thread started by :meth:`MqttConnection.start`
  is the only code that touches the client: it runs ``client.loop()``,
  drains the events the callbacks queued, tracks :class:`ConnectionState`,
  reconnects after a capped, jittered exponential backoff, (re)subscribes on
  every connect, and performs the publishes other threads asked for (once
  connected, so they are sized against the limit the broker announced).
  Callbacks do nothing but ``put`` on a :class:`queue.Queue`; incoming
  messages go to :attr:`MqttConnection.inbox` for the agent's own loop. Why
  not ``loop_start()``: with paho's reconnect off its thread ends at the
  first drop, and outside that mode ``publish()`` from another thread writes
  to the socket directly, racing the loop; one owning thread avoids both.
- **The backoff resets only for a connection that proved itself**: it stayed
  up ``stable_after_s`` or the broker acknowledged one of the agent's own
  publishes. A connection the broker drops right after CONNACK (e.g. for an
  oversized packet that paho resends on every reconnect) keeps the delays
  growing, so a misconfigured device retries a few times a minute, not 160.
- :meth:`MqttConnection.publish_checked` sizes every payload against the
  packet limit *before* anything reaches paho, which ignores the broker's
  maximum packet size (:mod:`device_agent.daemon.packet_limit`: the limit,
  the smaller one a broker announces, what a drop says about it).
- **Reports at the default level (WARNING), one line each, rate-limited:** a
  broker that cannot be reached (host:port and the reason), a lost
  connection, a refused password, a packet-size mismatch.
- **Passwords** are read again before every connect attempt; when the broker
  refuses one, the next attempt uses the file's second line (rotation).
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent.daemon.backoff import Backoff, BackoffPolicy, Throttle
from device_agent.daemon.config import BrokerConfig, OversizePolicy
from device_agent.daemon.connection_types import (
    ConnectionState,
    InboundMessage,
    MqttProtocol,
    PublishTicket,
    _ConnAck,
    _Event,
    _guarded,
    _Lost,
    _Published,
    _SubAck,
    drain,
)
from device_agent.daemon.packet_limit import PACKET_TOO_LARGE, PacketLimit
from device_agent.protocol.chunking import PayloadTooLargeError, check_publish_size, frames_for_publish

__all__ = ["ConnectionState", "InboundMessage", "MqttConnection", "MqttProtocol", "PublishTicket", "drain"]

logger = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
#: A connection that stays up this long (seconds) has proved itself: the next drop starts the backoff afresh.
STABLE_AFTER_S = 10.0
#: Repeated reports (unreachable broker, refused password, packet-size trouble) at most once per this many seconds.
REPORT_INTERVAL_S = 60.0
_SESSION_NEVER_EXPIRES = 0xFFFFFFFF
#: Until a first connect settles the MQTT version (``auto``), an MQTT 5 CONNACK must come this fast, else 3.1.1 is tried.
_PROBE_TIMEOUT_S = 2.0
_UNSUPPORTED_PROTOCOL = (0x84, 1)  # MQTT 5 reason code; the 3.1.1 return code
_BAD_CREDENTIALS = (0x86, 0x87, 4, 5)  # 5: bad user name or password, not authorized; 3.1.1: 4, 5
_PACKET_TOO_LARGE = 0x95


class MqttConnection:
    """A managed connection to the regional broker for one device.

    ``subscriptions`` are (re)subscribed at QoS 1 on every connect. ``clock``
    (monotonic seconds) and ``rng`` (backoff jitter) are injectable;
    ``poll_interval_s`` bounds how long a publish waits for the network thread.
    ``stable_after_s``: how long a connection must stay up before the backoff
    resets (an acknowledged publish of the agent's own resets it sooner).
    ``online_payload`` / ``offline_payload`` make what goes on ``presence_topic``
    (retained, QoS 1) after each connect and as the will (None: ``online`` / ``offline``).
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
        protocol: MqttProtocol = MqttProtocol.AUTO,
        stable_after_s: float = STABLE_AFTER_S,
        online_payload: Callable[[], bytes] | None = None,
        offline_payload: Callable[[], bytes] | None = None,
    ) -> None:
        if poll_interval_s <= 0 or stable_after_s < 0:
            raise ValueError("poll_interval_s must be > 0 and stable_after_s >= 0")
        self.broker = broker
        self.client_id = client_id
        self.presence_topic = presence_topic
        self._online_payload = online_payload if online_payload is not None else lambda: ONLINE
        self._offline_payload = offline_payload if offline_payload is not None else lambda: OFFLINE
        self._presence_dirty = threading.Event()
        self.subscriptions = tuple(subscriptions)
        self.inbox: queue.Queue[InboundMessage] = queue.Queue()
        #: Successful connections so far (CONNACK accepted); a reconnect makes it 2.
        self.connects = 0
        #: Connect attempts so far (successful or not).
        self.attempts = 0
        self._packets = PacketLimit(broker.max_packet_size, report_interval_s=REPORT_INTERVAL_S, clock=clock)
        self.protocol = MqttProtocol.V311 if protocol is MqttProtocol.V311 else MqttProtocol.V5
        self._fallback = protocol is MqttProtocol.AUTO
        self._backoff = Backoff(backoff, rng=rng)
        self._clock = clock
        self._poll = poll_interval_s
        self._stable_after = stable_after_s
        self._connected_at = 0.0
        self._proved = False
        self._passwords: tuple[str, ...] = ()
        self._password_index = 0
        self._waiting: list[PublishTicket] = []
        self._unreachable = Throttle(REPORT_INTERVAL_S, clock=clock)
        self._events: queue.Queue[_Event] = queue.Queue()
        self._commands: queue.Queue[PublishTicket] = queue.Queue()
        self._subscription_changes: queue.Queue[tuple[bool, tuple[str, ...]]] = queue.Queue()
        self._pending_changes: list[tuple[bool, tuple[str, ...]]] = []
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
    def packet_limit(self) -> int:
        """The largest PUBLISH sent: ``broker.max_packet_size``, or the broker's own limit when its CONNACK announced a smaller one."""
        return self._packets.limit

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
        frames = self._frames(topic, payload, retain=retain)
        ticket = PublishTicket(topic, frames, qos=qos, retain=retain, payload=payload)
        if len(frames) > 1:
            logger.info("payload of %d bytes for %s goes out as %d chunk frames", len(payload), topic, len(frames))
        self._commands.put(ticket)
        return ticket

    def subscribe(self, topics: Sequence[str]) -> None:
        """Subscribe (QoS 1) to ``topics`` now, or right after the next connect when down.

        Unlike :attr:`subscriptions` these are not renewed on later connects:
        a caller that heard nothing asks again (the release client does, per chunk).
        """
        if topics:
            self._subscription_changes.put((True, tuple(topics)))

    def unsubscribe(self, topics: Sequence[str]) -> None:
        """Unsubscribe from ``topics`` (filters subscribed with :meth:`subscribe`)."""
        if topics:
            self._subscription_changes.put((False, tuple(topics)))

    def _run_subscription_changes(self) -> None:
        self._pending_changes.extend(drain(self._subscription_changes))
        if self._state is not ConnectionState.CONNECTED:
            return
        changes, self._pending_changes = self._pending_changes, []
        for add, topics in changes:
            if add:
                self._client.subscribe([(topic, 1) for topic in topics])
            else:
                self._client.unsubscribe(list(topics))

    def _frames(self, topic: str, payload: bytes, *, retain: bool) -> list[bytes]:
        limit = self.packet_limit
        if retain or self.broker.oversized is OversizePolicy.REFUSE:
            check_publish_size(len(payload), limit, topic=topic)
            frames = [payload]
        else:
            frames = frames_for_publish(payload, broker_limit=limit, topic=topic)
        for frame in frames:  # belt and braces: no frame may reach paho unchecked
            check_publish_size(len(frame), limit, topic=topic)
        return frames

    def refresh_presence(self) -> None:
        """Publish a fresh ``online_payload()`` (retained) as soon as connected; repeated calls coalesce."""
        self._presence_dirty.set()

    def close(self, *, graceful: bool = True, timeout: float = 5.0) -> None:
        """Stop the network thread. ``graceful``: publish ``offline`` and DISCONNECT; else drop the socket (the will fires)."""
        self._graceful = graceful
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- paho client and its callbacks (enqueue only) --------------------------------------

    def _make_client(self) -> mqtt.Client:
        v5 = self.protocol is MqttProtocol.V5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else False,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
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
        client.on_connect = _guarded("connect", lambda c, u, flags, rc, props: events.put(_ConnAck(
            accepted=not rc.is_failure, reason=str(rc), code=int(rc.value), session_present=bool(flags.session_present),
            max_packet_size=getattr(props, "MaximumPacketSize", None))))
        client.on_disconnect = _guarded("disconnect", lambda c, u, flags, rc, props: events.put(
            _Lost(reason=str(rc), code=int(rc.value))))
        client.on_subscribe = _guarded("subscribe", lambda c, u, mid, rcs, props: events.put(
            _SubAck(refused=tuple(str(rc) for rc in rcs if rc.is_failure))))
        client.on_publish = _guarded("publish", lambda c, u, mid, rc, props: events.put(
            _Published(mid=mid, refused=str(rc) if rc.is_failure else "")))
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
        self._take_commands()
        if self._state is ConnectionState.DISCONNECTED:
            wait = self._next_attempt - self._clock()
            if wait > 0:
                self._closing.wait(min(wait, self._poll))
                return
            self._attempt()
            return
        if self._state is ConnectionState.CONNECTING and self._clock() > self._connack_deadline:
            if self._fallback and self.protocol is MqttProtocol.V5:
                # amqtt 0.12 neither answers nor closes an MQTT 5 CONNECT that carries a will
                self._switch_protocol(f"no CONNACK within {_PROBE_TIMEOUT_S:g} s")
                return
            self._mark_down(f"no CONNACK within {self.broker.connect_timeout_s} s")
            return
        if self._state is ConnectionState.CONNECTED:
            if self._presence_dirty.is_set():
                self._presence_dirty.clear()
                self._publish_presence(online=True)
            self._run_commands()
        self._run_subscription_changes()
        rc = self._client.loop(timeout=self._poll)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._drain_events()  # the on_disconnect event, when paho raised one, names the reason
            if self._state is ConnectionState.CONNECTING and self._fallback:
                # Closed before any CONNACK: some 3.1.1-only brokers (amqtt) drop an MQTT 5 CONNECT without answering.
                self._switch_protocol(mqtt.error_string(rc))
                return
            self._mark_down(mqtt.error_string(rc))

    def _switch_protocol(self, reason: str) -> None:
        """Before the first successful connect (``auto``): try the other MQTT version next (3.1.1 at once, 5 after a delay)."""
        to_v311 = self.protocol is MqttProtocol.V5
        logger.info("broker %s closed an MQTT %s connect (%s); trying MQTT %s", self._address, self.protocol.value,
                    reason, "3.1.1" if to_v311 else "5")
        self._drop_socket()
        self.protocol = MqttProtocol.V311 if to_v311 else MqttProtocol.V5
        self._client = self._make_client()
        self._mark_down(f"closed before CONNACK ({reason})", retry_now=to_v311)

    @property
    def _address(self) -> str:
        return f"{self.broker.host}:{self.broker.port}"

    def _attempt(self) -> None:
        self._set_state(ConnectionState.CONNECTING)
        self.attempts += 1
        probing = self._fallback and self.protocol is MqttProtocol.V5
        self._connack_deadline = self._clock() + (min(_PROBE_TIMEOUT_S, self.broker.connect_timeout_s) if probing
                                                  else self.broker.connect_timeout_s)
        self._client.username_pw_set(self.broker.username or self.client_id, self._password())
        will = self._presence(online=False)
        if will is None:
            self._client.will_clear()
        else:  # made afresh for every attempt: a signed status says when it was made
            self._client.will_set(self.presence_topic, will, qos=1, retain=True)
        v5 = self.protocol is MqttProtocol.V5
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = _SESSION_NEVER_EXPIRES
        try:
            if v5:
                self._client.connect(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s,
                                     clean_start=False, properties=properties)
            else:
                self._client.connect(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s)
        except (OSError, ValueError) as exc:  # ssl.SSLError and socket timeouts are OSErrors
            self._mark_down(f"connect failed: {exc}")

    def _password(self) -> str | None:
        """The password for this attempt, read afresh (a rotated file is picked up without a restart)."""
        try:
            self._passwords = self.broker.read_passwords()
        except OSError as exc:
            logger.warning("cannot read the MQTT password file %s (%s); using the password read before",
                           self.broker.password_file, exc.strerror or exc)
        if not self._passwords:
            return None
        return self._passwords[self._password_index % len(self._passwords)]

    def _mark_down(self, reason: str, *, retry_now: bool = False) -> None:
        if self._state is ConnectionState.DISCONNECTED:
            return
        was_up = self._state is ConnectionState.CONNECTED
        lasted = self._clock() - self._connected_at if was_up else 0.0
        self._set_state(ConnectionState.DISCONNECTED)
        if was_up and (self._proved or lasted >= self._stable_after):
            self._backoff.reset()  # it worked for a while: start the delays afresh
        delay = 0.0 if retry_now else self._backoff.next_delay()
        self._next_attempt = self._clock() + delay
        if was_up:
            logger.warning("MQTT connection to %s lost after %.1f s (%s); next attempt in %.2f s",
                           self._address, lasted, reason, delay)
            self._packets.explain_drop(reason, lasted, suspicious=not (self._proved or lasted >= self._stable_after),
                                       address=self._address, client_id=self.client_id)
        elif not retry_now:
            report, held = self._unreachable.ready()
            log = logger.warning if report else logger.info
            log("MQTT cannot reach broker %s as %s: %s; next attempt in %.2f s%s", self._address, self.client_id,
                reason, delay, f" ({held} more failed attempts since the last report)" if report and held else "")
        self._packets.forget()

    def _drain_events(self) -> None:
        for event in drain(self._events):
            if isinstance(event, _ConnAck):
                self._on_connack(event)
            elif isinstance(event, _Lost):
                self._mark_down(PACKET_TOO_LARGE if event.code == _PACKET_TOO_LARGE else event.reason)
            elif isinstance(event, _Published):
                self._on_published(event)
            elif event.refused:
                logger.error("broker refused subscriptions of %s: %s", self.client_id, ", ".join(event.refused))

    def _on_published(self, event: _Published) -> None:
        self._packets.acknowledged(event.mid)
        ticket = self._in_flight.pop(event.mid, None)
        if ticket is None:
            return
        if event.refused:  # MQTT 5 only: 3.1.1 brokers acknowledge what they drop
            logger.error("broker %s refused a PUBLISH to %s: %s", self._address, ticket.topic, event.refused)
        elif ticket.topic != self.presence_topic:
            self._proved = True  # the broker took one of our own messages: the connection works
        ticket._confirm(event.mid)

    def _on_connack(self, event: _ConnAck) -> None:
        if not event.accepted:
            self._on_refused(event)
            return
        self.connects += 1
        self._fallback = False  # this version works with this broker: keep it
        self._connected_at = self._clock()
        self._proved = False
        self._unreachable.clear()
        self._packets.adopt(event.max_packet_size, address=self._address)  # before CONNECTED: publish_checked must see it
        self._set_state(ConnectionState.CONNECTED)
        logger.info("MQTT connected to %s as %s (MQTT %s, session present: %s)",
                    self._address, self.client_id, self.protocol.value, event.session_present)
        # Subscribe every time: a broker that lost its persistence lost the subscriptions too.
        if self.subscriptions:
            self._client.subscribe([(topic, 1) for topic in self.subscriptions])
        self._presence_dirty.clear()  # the status published now carries every change made so far
        self._publish_presence(online=True)

    def _presence(self, *, online: bool) -> bytes | None:
        """The presence (status) payload to publish now, or None when making it failed (logged)."""
        try:
            return (self._online_payload if online else self._offline_payload)()
        except Exception:  # noqa: BLE001 - a status that cannot be made must not take the connection down
            logger.exception("cannot make the %s payload for %s", "online" if online else "offline", self.presence_topic)
            return None

    def _publish_presence(self, *, online: bool) -> mqtt.MQTTMessageInfo | None:
        payload = self._presence(online=online)
        if payload is None:
            return None
        return self._client.publish(self.presence_topic, payload, qos=1, retain=True)

    def _on_refused(self, event: _ConnAck) -> None:
        if event.code in _UNSUPPORTED_PROTOCOL and self.protocol is MqttProtocol.V5 and self._fallback:
            self._switch_protocol(f"CONNACK {event.reason}")
            return
        if event.code in _BAD_CREDENTIALS and len(self._passwords) > 1:
            self._password_index += 1
            logger.warning("broker %s refused the credentials of %s (%s); trying the other password in %s",
                           self._address, self.client_id, event.reason, self.broker.password_file)
            self._mark_down(f"CONNACK {event.reason}", retry_now=self._password_index % len(self._passwords) != 0)
            return
        logger.error("broker %s refused the connection of %s: %s", self._address, self.client_id, event.reason)
        self._mark_down(f"CONNACK {event.reason}")

    def _drop_socket(self) -> None:
        sock = self._client.socket()
        if sock is not None:
            sock.close()

    def _take_commands(self) -> None:
        self._waiting.extend(drain(self._commands))

    def _run_commands(self) -> None:
        """Hand the waiting publishes to paho (connected: the broker's limit is known); re-frame any that no longer fit."""
        waiting, self._waiting = self._waiting, []
        for ticket in waiting:
            if any(not self._packets.fits(len(f), ticket.topic) for f in ticket.payloads):
                try:
                    ticket.payloads = self._frames(ticket.topic, ticket.payload, retain=ticket.retain)
                except PayloadTooLargeError as exc:
                    ticket.dropped = str(exc)
                    logger.error("dropped a publish to %s: %s", ticket.topic, exc)
                    continue
            mids = []
            for frame in ticket.payloads:
                mid = self._client.publish(ticket.topic, frame, qos=ticket.qos, retain=ticket.retain).mid
                self._packets.sent(mid, len(frame))
                mids.append(mid)
            self._in_flight.update((mid, ticket) for mid in mids)
            ticket._handed(mids)

    def _goodbye(self) -> None:
        self._take_commands()
        if self._state is ConnectionState.CONNECTED:
            self._run_commands()
        if self._state is not ConnectionState.CONNECTED or not self._graceful:
            self._drop_socket()  # no DISCONNECT: the broker publishes the will
            return
        info = self._publish_presence(online=False)
        deadline = self._clock() + min(2.0, self.broker.connect_timeout_s)
        while info is not None and not info.is_published() and self._clock() < deadline:
            if self._client.loop(timeout=self._poll) != mqtt.MQTT_ERR_SUCCESS:
                break
        self._client.disconnect()
        self._client.loop(timeout=self._poll)
