"""The aggregators on MQTT: a regional service and a root service around the transport-agnostic tiers.

Shape (paho-mqtt 2.x, callback API version 2, MQTT v3.1.1):

- A **clean session** under a per-process client id: members of a shared
  subscription group must not leave a persistent session behind, or Mosquitto
  keeps queueing their share of the updates for them (docs/broker.md). What a
  dead process had received but not committed gets no receipt; devices resend.
- paho's network thread (``loop_start``) reconnects with capped backoff.
  Callbacks only put events on a queue; the **service loop**, in the thread
  that calls :meth:`MqttAggregatorService.run`, does all the work: it
  (re)subscribes on every CONNACK, routes messages by topic, reassembles
  chunked payloads (keyed by the sender named in the topic), calls the
  aggregator, publishes what it returns, checks on a timer whether the round
  should close, and writes counters periodically. The aggregator's SQLite
  connection therefore stays in one thread.
- Every payload is checked against the broker's size limit *before* it reaches
  paho (which would otherwise be disconnected and resend it forever): receipts
  and retained models are refused when too large, aggregates are chunked.
- Rejections are data: the aggregator counts and logs bad updates; what the
  service itself drops (unroutable topics, bad chunks, oversized payloads,
  refused models, handler errors) is counted in :meth:`counters` and logged.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.errors import MalformedMessageError
from device_agent.protocol.chunking import PayloadTooLargeError, Reassembler, check_publish_size, frames_for_publish, is_chunk
from device_agent.protocol.topics import TopicLayout
from sdk.aggregator.errors import ModelRejectedError
from sdk.aggregator.outcomes import HandledUpdate
from sdk.aggregator.regional import RegionalAggregator
from sdk.aggregator.root import RootAggregator
from sdk.aggregator.round_state import RoundStatus
from sdk.aggregator.service_config import BrokerSettings, LoopSettings

logger = logging.getLogger(__name__)


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


_Event = Union[_Connected, _Lost, _Subscribed, _Inbound]


@dataclass(frozen=True, kw_only=True)
class ServiceReport:
    """How a :meth:`~MqttAggregatorService.run` ended: ``stopped`` (the stop event) or ``time_limit``;
    ``counters`` are the service's own drop counters (the aggregator keeps the rejections)."""

    ended_by: str
    connects: int
    counters: Mapping[str, int]


def _enqueue(events: queue.Queue[_Event], name: str, make: Callable[..., _Event | None]) -> Callable[..., None]:
    """A paho callback that only enqueues ``make(*args)``; it never raises into paho's network thread."""

    def callback(*args: object) -> None:
        try:
            event = make(*args)
            if event is not None:
                events.put(event)
        except Exception:  # noqa: BLE001 - a callback must not kill paho's loop
            logger.exception("MQTT %s callback failed", name)

    return callback


def make_client(settings: BrokerSettings, events: queue.Queue[_Event]) -> mqtt.Client:
    """A paho client for ``settings`` (clean session, TLS and credentials applied) whose callbacks fill ``events``."""
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
    client.on_connect = _enqueue(events, "connect", lambda c, u, flags, rc, props: _Connected(not rc.is_failure, str(rc)))
    client.on_disconnect = _enqueue(events, "disconnect", lambda c, u, flags, rc, props: _Lost(str(rc)))
    client.on_subscribe = _enqueue(events, "subscribe", lambda c, u, mid, rcs, props: _Subscribed(
        tuple(str(rc) for rc in rcs if rc.is_failure)))
    client.on_message = _enqueue(events, "message", lambda c, u, msg: _Inbound(msg.topic, bytes(msg.payload)))
    return client


class MqttAggregatorService:
    """What both services share: the connection, the event loop, publishing with size checks, counters.

    Subclasses name their :meth:`subscriptions` and implement the hooks
    :meth:`on_connected`, :meth:`handle_message` and :meth:`on_tick`.
    ``clock`` (monotonic seconds) paces the loop and the periodic counter flush.
    """

    def __init__(self, *, layout: TopicLayout, broker: BrokerSettings, loop: LoopSettings = LoopSettings(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.layout = layout
        self.broker = broker
        self.loop_settings = loop
        #: Set once the broker granted this connection's subscriptions (cleared when the connection drops).
        self.subscribed = threading.Event()
        self._clock = clock
        self._events: queue.Queue[_Event] = queue.Queue()
        self._client = make_client(broker, self._events)
        self._reassembler = Reassembler(clock=clock)
        self._counters: Counter[str] = Counter()
        self._connects = 0

    def subscriptions(self) -> Sequence[str]:
        """The topic filters (QoS 1) subscribed on every connect."""
        raise NotImplementedError

    def on_connected(self, first: bool) -> None:
        """Hook after each accepted CONNACK (``first``: the first of this run)."""

    def handle_message(self, topic: str, payload: bytes) -> None:
        """Hook for one inbound message."""
        raise NotImplementedError

    def on_tick(self) -> None:
        """Hook called every ``tick_s`` and after each message."""

    def flush_counters(self) -> None:
        """Hook to write the aggregator's pending counters."""

    def counters(self) -> dict[str, int]:
        """The service's own drop counters (``unroutable_topic``, ``bad_chunk``, ``oversized:<what>``...)."""
        return dict(self._counters)

    def run(self, stop_event: threading.Event, max_seconds: float | None = None) -> ServiceReport:
        """Connect and serve until ``stop_event`` is set or ``max_seconds`` pass (None: no limit); then disconnect."""
        deadline = None if max_seconds is None else self._clock() + max_seconds
        tick = self.loop_settings.tick_s
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s)
        self._client.loop_start()
        next_flush = self._clock() + self.loop_settings.flush_every_s
        ended_by = "stopped"
        try:
            while not stop_event.is_set():
                if deadline is not None and self._clock() >= deadline:
                    ended_by = "time_limit"
                    break
                try:
                    self._dispatch(self._events.get(timeout=tick))
                except queue.Empty:
                    pass
                self._guarded("tick", self.on_tick)
                if self._clock() >= next_flush:
                    self._guarded("counter flush", self.flush_counters)
                    next_flush = self._clock() + self.loop_settings.flush_every_s
        finally:
            self._client.disconnect()
            self._client.loop_stop()
            self.subscribed.clear()
            self._guarded("counter flush", self.flush_counters)
        logger.info("service %s ended (%s) after %d connects", self.broker.client_id, ended_by, self._connects)
        return ServiceReport(ended_by=ended_by, connects=self._connects, counters=self.counters())

    def _dispatch(self, event: _Event) -> None:
        if isinstance(event, _Inbound):
            self._guarded(f"message on {event.topic}", lambda: self.handle_message(event.topic, event.payload))
        elif isinstance(event, _Connected):
            if not event.accepted:
                logger.error("broker %s:%d refused %s: %s", self.broker.host, self.broker.port, self.broker.client_id, event.reason)
                return
            self._connects += 1
            logger.info("connected to %s:%d as %s", self.broker.host, self.broker.port, self.broker.client_id)
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
            logger.warning("connection of %s lost (%s); paho reconnects", self.broker.client_id, event.reason)

    def _guarded(self, what: str, body: Callable[[], None]) -> None:
        try:
            body()
        except Exception:  # noqa: BLE001 - one bad message or tick must not stop the service
            self.count("handler_error")
            logger.exception("aggregator service: %s failed", what)

    def group_filter(self, topic_filter: str) -> str:
        """``topic_filter`` behind ``$share/<group>/`` when ``broker.share_group`` is set, else unchanged."""
        group = self.broker.share_group
        return topic_filter if group is None else self.layout.shared(group, topic_filter)

    def count(self, name: str) -> None:
        """Add one to the service counter ``name``."""
        self._counters[name] += 1

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
        return True


class RegionalService(MqttAggregatorService):
    """A region's aggregator on its regional broker.

    Devices' updates arrive through the shared subscription (or a direct one
    when ``broker.share_group`` is None); each gets its receipt on
    ``dev/<id>/down/receipt``. The root's model (bridged in) starts a round and
    the region's signed model is published retained on ``model/global``. When
    the round should close, the sealed aggregate goes to
    ``region/<region>/up/aggregate``. On its first connect it republishes the
    current model and, when the round is closed, the stored aggregate (the
    root recognises a resend as a duplicate). With FedFomo on it also answers
    candidate requests on ``dev/<id>/up/candidates`` with sealed candidates on
    ``dev/<id>/down/candidates``.
    """

    def __init__(self, aggregator: RegionalAggregator, *, region: str, layout: TopicLayout, broker: BrokerSettings,
                 loop: LoopSettings = LoopSettings(), clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(layout=layout, broker=broker, loop=loop, clock=clock)
        self.aggregator = aggregator
        self.region = region

    def subscriptions(self) -> Sequence[str]:
        """The device update filter (shared when a group is set), the root model topic and,
        with FedFomo on, the candidate request filter (shared likewise)."""
        topics = [self.group_filter(self.layout.all_device_updates), self.layout.root_model]
        if self.aggregator.fomo_enabled:
            topics.append(self.group_filter(self.layout.all_candidate_requests))
        return tuple(topics)

    def on_connected(self, first: bool) -> None:
        """Republish the current model (retained); on the first connect also a stored aggregate."""
        model = self.aggregator.current_model()
        if model is not None:
            self.publish(self.layout.global_model, model, retain=True)
        if first and self.aggregator.status().status is RoundStatus.CLOSED:
            self.forward_aggregate()

    def handle_message(self, topic: str, payload: bytes) -> None:
        """Route one message: the root model, or a device's (possibly chunked) update."""
        if topic == self.layout.root_model:
            self.handle_root_model(payload)
            return
        device = self.layout.device_of(topic)
        if device is not None and topic == self.layout.device_candidate_request(device) and self.aggregator.fomo_enabled:
            self.handle_candidate_request(payload, device=device)
            return
        if device is None or topic != self.layout.device_update(device):
            self.count("unroutable_topic")
            logger.warning("ignoring a message on %s", topic)
            return
        blob = self.reassemble(payload, sender=device)
        if blob is not None:
            self.handle_update(blob, device=device)

    def handle_candidate_request(self, payload: bytes, *, device: str) -> None:
        """Answer a device's FedFomo request with its sealed candidates, chunked to fit (nothing for a refused request)."""
        answer = self.aggregator.handle_candidate_request(payload, topic_device=device)
        if answer.blob is not None:
            self.publish(self.layout.device_candidates(device), answer.blob, chunk=True)

    def handle_root_model(self, blob: bytes) -> None:
        """Start the round of the root's model and publish the region's signed model retained."""
        try:
            model = self.aggregator.handle_root_model(blob)
        except ModelRejectedError as exc:
            self.count(f"model_refused:{exc.reason}")  # the aggregator counted and logged it as well
            return
        self.publish(self.layout.global_model, model, retain=True)

    def handle_update(self, blob: bytes, *, device: str) -> HandledUpdate:
        """Hand one whole update to the aggregator and send its receipt (none for unauthenticated input)."""
        handled = self.aggregator.handle_update(blob, topic_device=device)
        if handled.receipt is not None:
            self.publish(self.layout.device_receipt(device), handled.receipt)
        self.on_tick()  # a quorum may have just been reached
        return handled

    def on_tick(self) -> None:
        """Expire stale chunks; close the round and forward its aggregate when it should close."""
        self._reassembler.expire()
        if self.aggregator.should_close():
            self.forward_aggregate()

    def forward_aggregate(self) -> None:
        """Close the round (idempotent) and publish the sealed aggregate, chunked to fit; nothing for an empty round."""
        aggregate = self.aggregator.close_round()
        if aggregate.blob is None:
            logger.warning("region %s round %d closed without updates: nothing to forward", self.region, aggregate.round)
            return
        if self.publish(self.layout.region_aggregate(self.region), aggregate.blob, chunk=True):
            logger.info("region %s forwarded round %d: %d updates, %d samples",
                        self.region, aggregate.round, aggregate.update_count, aggregate.sample_count)

    def flush_counters(self) -> None:
        """Write the aggregator's pending rejection counters."""
        self.aggregator.flush_counters()


class RootService(MqttAggregatorService):
    """The root aggregator on the root broker.

    Regions' aggregates (bridged out from the regional brokers) arrive on
    ``region/+/up/aggregate``; the round closes when the aggregator's policy
    says so (quorum = every expected region, or the deadline) and the next
    signed global model is published retained on ``root/model/global``.
    ``initial_params``: round 0's global model, started when the store has no
    round yet (None: wait for an operator to start one). Every connect
    republishes the current model (retained).
    """

    def __init__(self, aggregator: RootAggregator, *, layout: TopicLayout, broker: BrokerSettings,
                 loop: LoopSettings = LoopSettings(), initial_params: Mapping[str, np.ndarray] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(layout=layout, broker=broker, loop=loop, clock=clock)
        self.aggregator = aggregator
        self._initial = initial_params

    def subscriptions(self) -> Sequence[str]:
        """The region aggregate filter (shared when a group is set)."""
        return (self.group_filter(self.layout.all_region_aggregates),)

    def bootstrap_round(self) -> None:
        """Start round 0 from ``initial_params`` when no round exists yet; otherwise nothing."""
        if self._initial is not None and self.aggregator.current_model() is None:
            self.aggregator.start_round(0, self._initial)

    def run(self, stop_event: threading.Event, max_seconds: float | None = None) -> ServiceReport:
        """Bootstrap round 0 if needed, then serve (see :meth:`MqttAggregatorService.run`)."""
        self.bootstrap_round()
        return super().run(stop_event, max_seconds)

    def on_connected(self, first: bool) -> None:
        """Republish the current global model (retained)."""
        model = self.aggregator.current_model()
        if model is not None:
            self.publish(self.layout.root_model, model, retain=True)

    def handle_message(self, topic: str, payload: bytes) -> None:
        """Take one region's (possibly chunked) aggregate."""
        region = self.layout.region_of(topic)
        if region is None or topic != self.layout.region_aggregate(region):
            self.count("unroutable_topic")
            logger.warning("ignoring a message on %s", topic)
            return
        blob = self.reassemble(payload, sender=region)
        if blob is None:
            return
        handled = self.aggregator.handle_aggregate(blob, topic_region=region)
        # Receipts for regions have no topic yet (docs/aggregation.md): the aggregator logged the verdict.
        logger.debug("aggregate from %s: %s %s", region, handled.verdict.value, handled.reason)
        self.on_tick()

    def on_tick(self) -> None:
        """Expire stale chunks; close the round and publish the next global model when it should close."""
        self._reassembler.expire()
        if self.aggregator.should_close():
            model = self.aggregator.close_round()
            self.publish(self.layout.root_model, model, retain=True)

    def flush_counters(self) -> None:
        """Write the aggregator's pending rejection counters."""
        self.aggregator.flush_counters()


__all__ = ["MqttAggregatorService", "RegionalService", "RootService", "ServiceReport", "make_client"]
