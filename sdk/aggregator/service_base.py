"""What both aggregator services share on MQTT: the connection, the inbox, the event loop, size-checked publishing.

Shape (paho-mqtt 2.x, callback API version 2, MQTT v3.1.1):

- A **clean session** under a per-process client id: members of a shared
  subscription group must not leave a persistent session behind, or Mosquitto
  keeps queueing their share of the updates for them (docs/broker.md). What a
  dead process had received but not committed gets no receipt; senders resend.
- paho's network thread (``loop_start``) reconnects with capped backoff.
  Callbacks only put events in a :class:`~sdk.aggregator.inbox.FairInbox`:
  a message from a sender (a device, or a region at the root, named by its
  topic) that exceeds its rate is dropped there, before any cryptography, and
  the rest are served round robin, so one flooding account cannot starve the
  others. The **service loop**, in the thread that calls
  :meth:`MqttAggregatorService.run`, does all the work: it (re)subscribes on
  every CONNACK, routes messages by topic, reassembles chunked payloads
  (keyed by the sender named in the topic), calls the aggregator, publishes
  what it returns, runs the subclass's timers, and writes counters
  periodically. The aggregator's SQLite connection therefore stays in one thread.
- Every payload is checked against the broker's size limit *before* it reaches
  paho (which would otherwise be disconnected and resend it forever).
- Rejections are data: the aggregator counts and logs bad updates; what the
  service itself drops (unroutable topics, bad chunks, oversized payloads,
  refused models, rate-limited senders, handler errors) is counted in
  :meth:`MqttAggregatorService.counters` and logged.
- Every service records its Prometheus metrics in a
  :class:`~sdk.aggregator.metrics.ServiceMetrics` (:attr:`MqttAggregatorService.metrics`),
  served with :meth:`MqttAggregatorService.health` by
  :class:`~sdk.aggregator.metrics_endpoint.MetricsEndpoint` when configured.
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.errors import MalformedMessageError
from device_agent.protocol.chunking import PayloadTooLargeError, Reassembler, check_publish_size, frames_for_publish, is_chunk
from device_agent.protocol.topics import TopicLayout
from sdk.aggregator.inbox import FairInbox, InboxLimits
from sdk.aggregator.metrics import ServiceMetrics
from sdk.aggregator.metrics_endpoint import Health
from sdk.aggregator.outcomes import AggregatorStatus, HandledUpdate
from sdk.aggregator.round_state import RoundStatus
from sdk.aggregator.service_config import BrokerSettings, LoopSettings

logger = logging.getLogger(__name__)
_DROP_REPORT_S = 10.0
_ROUND_REFRESH_S = 1.0
_CHUNK_OVERHEAD = 1024


@dataclass(frozen=True)
class _Connected:
    accepted: bool
    reason: str


@dataclass(frozen=True)
class _Lost:
    reason: str


@dataclass(frozen=True)
class _Subscribed:
    refused: tuple[str, ...]


@dataclass(frozen=True)
class _Inbound:
    topic: str
    payload: bytes
    arrived: float


_Event = Union[_Connected, _Lost, _Subscribed, _Inbound]
#: The sender a topic names (a device id, a region), or None for the control lane.
SenderOf = Callable[[str], Union[str, None]]


@dataclass(frozen=True, kw_only=True)
class ServiceReport:
    """How a :meth:`~MqttAggregatorService.run` ended: ``stopped`` (the stop event) or ``time_limit``;
    ``counters`` are the service's own drop counters (the aggregator keeps the rejections)."""

    ended_by: str
    connects: int
    counters: Mapping[str, int]


def _enqueue(inbox: FairInbox[_Event], name: str, make: Callable[..., _Event | None],
             sender_of: SenderOf | None = None) -> Callable[..., None]:
    """A paho callback that only offers ``make(*args)`` to the inbox; it never raises into paho's network thread."""

    def callback(*args: object) -> None:
        try:
            event = make(*args)
            if event is None:
                return
            if isinstance(event, _Inbound) and sender_of is not None:
                inbox.offer(sender_of(event.topic), event, len(event.payload))
            else:
                inbox.offer(None, event)
        except Exception:  # noqa: BLE001 - a callback must not kill paho's loop
            logger.exception("MQTT %s callback failed", name)

    return callback


def make_client(settings: BrokerSettings, inbox: FairInbox[_Event], sender_of: SenderOf, *,
                clock: Callable[[], float] = time.monotonic, metrics: ServiceMetrics | None = None) -> mqtt.Client:
    """A paho client for ``settings`` (clean session, TLS and credentials applied) whose callbacks fill ``inbox``
    (each message stamped with ``clock()`` on arrival and counted in ``metrics``)."""

    def inbound(c: object, u: object, msg: mqtt.MQTTMessage) -> _Inbound:
        payload = bytes(msg.payload)
        if metrics is not None:
            metrics.message_received(msg.topic, len(payload))
        return _Inbound(msg.topic, payload, clock())

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id, clean_session=True, protocol=mqtt.MQTTv311)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls_ca_file is not None:
        client.tls_set(
            ca_certs=str(settings.tls_ca_file),
            certfile=None if settings.tls_cert_file is None else str(settings.tls_cert_file),
            keyfile=None if settings.tls_key_file is None else str(settings.tls_key_file),
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
    client.on_connect = _enqueue(inbox, "connect", lambda c, u, flags, rc, props: _Connected(not rc.is_failure, str(rc)))
    client.on_disconnect = _enqueue(inbox, "disconnect", lambda c, u, flags, rc, props: _Lost(str(rc)))
    client.on_subscribe = _enqueue(inbox, "subscribe", lambda c, u, mid, rcs, props: _Subscribed(
        tuple(str(rc) for rc in rcs if rc.is_failure)))
    client.on_message = _enqueue(inbox, "message", inbound, sender_of)
    return client


class MqttAggregatorService:
    """What both services share: the connection, the event loop, publishing with size checks, counters.

    Subclasses name their :meth:`subscriptions` and implement the hooks
    :meth:`on_connected`, :meth:`handle_message`, :meth:`on_tick` and
    :meth:`sender_of`. ``clock`` (monotonic seconds) paces the loop, the
    periodic counter flush and the inbox's rate limits. ``inbox`` None derives
    the limits from ``loop`` (:meth:`inbox_limits`). ``metrics``: where the
    service records its Prometheus metrics (subclasses make one when None).
    """

    def __init__(self, *, layout: TopicLayout, broker: BrokerSettings, metrics: ServiceMetrics,
                 loop: LoopSettings = LoopSettings(), clock: Callable[[], float] = time.monotonic,
                 inbox: InboxLimits | None = None) -> None:
        self.layout = layout
        self.broker = broker
        self.loop_settings = loop
        self.metrics = metrics
        #: Set once the broker granted this connection's subscriptions (cleared when the connection drops).
        self.subscribed = threading.Event()
        self._clock = clock
        self.inbox: FairInbox[_Event] = FairInbox(inbox if inbox is not None else self.inbox_limits(), clock=clock)
        metrics.inbox_pending.set_function(self.inbox.pending)
        self._client = make_client(broker, self.inbox, self.sender_of, clock=clock, metrics=metrics)
        self._reassembler = Reassembler(clock=clock)
        self._counters: Counter[str] = Counter()
        self._connects = 0
        self._next_drop_report = clock() + _DROP_REPORT_S
        #: When the message being handled arrived (its last frame), for the receipt latency; None outside a message.
        self.arrived: float | None = None
        self._last_loop: float | None = None
        self._next_round_refresh = clock()

    def inbox_limits(self) -> InboxLimits:
        """Per-sender limits from ``loop_settings``; a burst of None is sized to the model: room for two chunked
        updates (:meth:`expected_update_bytes` at the broker's size limit) plus a few requests, at least 32."""
        settings = self.loop_settings
        burst = settings.sender_burst
        if burst is None:
            frames = math.ceil(self.expected_update_bytes() / max(1, self.broker.max_packet_size - _CHUNK_OVERHEAD))
            burst = max(32, 2 * frames + 8)
        return InboxLimits(rate_per_s=settings.sender_rate_per_s, burst=burst, max_pending_bytes=settings.max_pending_bytes)

    def expected_update_bytes(self) -> int:
        """The size of one update a sender sends (sizes the default burst); 0 when unknown."""
        return 0

    def subscriptions(self) -> Sequence[str]:
        """The topic filters (QoS 1) subscribed on every connect."""
        raise NotImplementedError

    def sender_of(self, topic: str) -> str | None:
        """The rate-limited sender a topic belongs to (None: the control lane). Runs in paho's thread: keep it cheap."""
        return None

    def on_connected(self, first: bool) -> None:
        """Hook after each accepted CONNACK (``first``: the first of this run)."""

    def handle_message(self, topic: str, payload: bytes) -> None:
        """Hook for one inbound message."""
        raise NotImplementedError

    def on_tick(self) -> None:
        """Hook called every ``tick_s`` and after each message."""

    def batch_due_in(self) -> float | None:
        """Hook: seconds until queued updates must be handled (0: now); None when nothing is queued."""
        return None

    def flush_batch(self, *, force: bool = False) -> None:
        """Hook called after every loop turn: handle queued updates when their batch is due (``force``: now)."""

    def round_status(self) -> AggregatorStatus | None:
        """Hook: the aggregator's status, for the round gauges and the "round open" line (None: nothing to report)."""
        return None

    def refresh_round(self, *, force: bool = False) -> None:
        """Update the current-round gauges from :meth:`round_status` (at most once a second unless ``force``);
        log a round this process had not seen yet."""
        now = self._clock()
        if not force and now < self._next_round_refresh:
            return
        self._next_round_refresh = now + _ROUND_REFRESH_S
        status = self.round_status()
        if status is None:
            return
        seen = self.metrics.round_seen(status.round, collecting=status.status is RoundStatus.COLLECTING,
                                       accepted=status.accepted, samples=status.samples)
        if seen is not None:
            state = "collecting" if status.status is RoundStatus.COLLECTING else "closed"
            logger.info("%s: round %d open (%s, %d update(s) so far)", self.describe(), seen, state, status.accepted)

    def describe(self) -> str:
        """What this service is, for its log lines (``regional aggregator eu``)."""
        return f"aggregator service {self.broker.client_id}"

    def health(self) -> Health:
        """Healthy while the loop turns (an iteration within ``max(5 s, 10 ticks)``) and the broker granted the
        subscriptions; what ``/healthz`` answers."""
        now = self._clock()
        problems = []
        stall = max(5.0, 10 * self.loop_settings.tick_s)
        loop_age = None if self._last_loop is None else now - self._last_loop
        if loop_age is None or loop_age > stall:
            problems.append("service loop not running" if loop_age is None else f"service loop stalled for {loop_age:.1f} s")
        if not self.subscribed.is_set():
            problems.append(f"not connected and subscribed to {self.broker.host}:{self.broker.port}")
        return Health(ok=not problems, problems=tuple(problems), detail={
            "service": self.describe(), "connects": self._connects,
            "loop_age_s": None if loop_age is None else round(loop_age, 3)})

    def flush_counters(self) -> None:
        """Hook to write the aggregator's pending counters."""

    def counters(self) -> dict[str, int]:
        """The service's own drop counters (``unroutable_topic``, ``bad_chunk``, ``oversized:<what>``, ``inbox:<reason>``...)."""
        self._report_drops()
        return dict(self._counters)

    def run(self, stop_event: threading.Event, max_seconds: float | None = None) -> ServiceReport:
        """Connect and serve until ``stop_event`` is set or ``max_seconds`` pass (None: no limit); then disconnect."""
        deadline = None if max_seconds is None else self._clock() + max_seconds
        tick = self.loop_settings.tick_s
        logger.info("%s starting: broker %s:%d as %s, %s", self.describe(), self.broker.host, self.broker.port,
                    self.broker.client_id, "TLS" if self.broker.tls_ca_file is not None else "plain TCP")
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s)
        self._client.loop_start()
        next_flush = self._clock() + self.loop_settings.flush_every_s
        next_tick = self._clock()
        ended_by = "stopped"
        try:
            while not stop_event.is_set():
                self._last_loop = self._clock()
                if deadline is not None and self._clock() >= deadline:
                    ended_by = "time_limit"
                    break
                wait = min(tick, next_tick - self._clock())
                batch_due = self.batch_due_in()
                event = self.inbox.take(timeout=max(0.0, wait if batch_due is None else min(wait, batch_due)))
                if event is not None:
                    self._dispatch(event)
                self._guarded("update batch", self.flush_batch)
                if event is None or self._clock() >= next_tick:
                    self._guarded("tick", self.on_tick)
                    self._guarded("round status", self.refresh_round)
                    next_tick = self._clock() + tick
                if self._clock() >= next_flush:
                    self._guarded("counter flush", self.flush_counters)
                    next_flush = self._clock() + self.loop_settings.flush_every_s
                if self._clock() >= self._next_drop_report:
                    self._report_drops()
        finally:
            self._guarded("update batch", lambda: self.flush_batch(force=True))
            self._client.disconnect()
            self._client.loop_stop()
            self.subscribed.clear()
            self.metrics.broker_connected.set(0)
            self._last_loop = None
            self._guarded("counter flush", self.flush_counters)
        logger.info("%s stopped (%s) after %d connection(s)", self.describe(), ended_by, self._connects)
        return ServiceReport(ended_by=ended_by, connects=self._connects, counters=self.counters())

    def _report_drops(self) -> None:
        """Fold the inbox's drops into the counters and log who was dropped (at most every few seconds)."""
        self._next_drop_report = self._clock() + _DROP_REPORT_S
        drops = self.inbox.drain_drops()
        if not drops:
            return
        by_sender: Counter[str] = Counter()
        for (reason, sender), n in drops.items():
            self._counters[f"inbox:{reason}"] += n
            self.metrics.inbox_drops(reason, n)
            by_sender[sender] += n
        worst = ", ".join(f"{sender} ({n})" for sender, n in by_sender.most_common(5))
        logger.warning("dropped %d message(s) before opening them (per-sender limits): %s", sum(by_sender.values()), worst)

    def _dispatch(self, event: _Event) -> None:
        if isinstance(event, _Inbound):
            self.arrived = event.arrived
            try:
                self._guarded(f"message on {event.topic}", lambda: self.handle_message(event.topic, event.payload))
            finally:
                self.arrived = None
        elif isinstance(event, _Connected):
            if not event.accepted:
                logger.error("broker %s:%d refused %s: %s", self.broker.host, self.broker.port, self.broker.client_id, event.reason)
                return
            self._connects += 1
            self.metrics.connected()
            logger.info("connected to %s:%d as %s%s", self.broker.host, self.broker.port, self.broker.client_id,
                        "" if self._connects == 1 else f" (reconnect {self._connects - 1})")
            self._client.subscribe([(topic, 1) for topic in self.subscriptions()])
            self._guarded("connect", lambda: self.on_connected(self._connects == 1))
        elif isinstance(event, _Subscribed):
            if event.refused:
                self.count("subscription_refused")
                logger.error("broker refused subscriptions of %s: %s", self.broker.client_id, ", ".join(event.refused))
            else:
                self.subscribed.set()
        else:
            self.subscribed.clear()
            self.metrics.disconnected()
            logger.warning("connection of %s to %s:%d lost (%s); paho reconnects", self.broker.client_id, self.broker.host,
                           self.broker.port, event.reason)

    def _guarded(self, what: str, body: Callable[[], None]) -> None:
        try:
            body()
        except Exception:  # noqa: BLE001 - one bad message or tick must not stop the service
            self.count("handler_error")
            logger.exception("aggregator service: %s failed", what)

    def subscribe_topics(self, topics: Sequence[str]) -> None:
        """Subscribe (QoS 1) to ``topics`` now (not renewed on reconnect: callers ask again, as the release follower does)."""
        if topics:
            self._client.subscribe([(topic, 1) for topic in topics])

    def unsubscribe_topics(self, topics: Sequence[str]) -> None:
        """Unsubscribe from ``topics``."""
        if topics:
            self._client.unsubscribe(list(topics))

    def group_filter(self, topic_filter: str) -> str:
        """``topic_filter`` behind ``$share/<group>/`` when ``broker.share_group`` is set, else unchanged."""
        group = self.broker.share_group
        return topic_filter if group is None else self.layout.shared(group, topic_filter)

    def count(self, name: str, *, drop: bool = True) -> None:
        """Add one to the service counter ``name`` (``drop``: also to ``fedge_service_dropped_total``)."""
        self._counters[name] += 1
        if drop:
            self.metrics.service_drop(name)

    def reassemble(self, payload: bytes, *, sender: str) -> bytes | None:
        """``payload`` itself, or for a chunk frame the whole message once complete (None until then, or when bad)."""
        if not is_chunk(payload):
            return payload
        try:
            return self._reassembler.add(payload, sender=sender)
        except MalformedMessageError as exc:
            self.count("bad_chunk")
            logger.warning("dropped a chunk from %s: %s", sender, exc)
            return None

    def take_aggregate(self, payload: bytes, *, child: str, handle: Callable[[bytes], HandledUpdate]) -> None:
        """One child tier's (possibly chunked) aggregate: ``handle`` it, answer with its signed receipt, count, tick."""
        blob = self.reassemble(payload, sender=child)
        if blob is None:
            return
        handled = handle(blob)
        if handled.receipt is not None:
            self.publish(self.layout.region_receipt(child), handled.receipt)
        self.metrics.update_handled(handled, arrived=self.arrived)
        logger.info("aggregate from %s: %s%s", child, handled.verdict.value, f" ({handled.reason})" if handled.reason else "")
        self.on_tick()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, chunk: bool = False) -> bool:
        """Publish at QoS 1 after the size check: chunked when ``chunk``, else refused (counted) when too large."""
        limit = self.broker.max_packet_size
        try:
            if chunk and not retain:
                frames = frames_for_publish(payload, broker_limit=limit, topic=topic)
            else:
                check_publish_size(len(payload), limit, topic=topic)
                frames = [payload]
        except PayloadTooLargeError as exc:
            self.count(f"oversized:{topic.rsplit('/', 1)[-1]}")
            logger.error("not publishing to %s: %s", topic, exc)
            return False
        for frame in frames:
            self._client.publish(topic, frame, qos=1, retain=retain)
            self.metrics.message_sent(topic, len(frame))
        return True
