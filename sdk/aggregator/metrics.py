"""The aggregator services' Prometheus metrics: one :class:`ServiceMetrics` per service, in its own registry.

Every name starts with ``fedge_``; docs/operations.md lists them with what
they mean and which values mean trouble. Label values come from closed sets
(verdicts, rejection reasons, topic kinds), never from a device id, so a
fleet of any size gives the same number of series. Counters are per
process (Prometheus sums members and handles restarts with ``rate()``);
gauges of the current round read the shared store.

The service loop records events through the verbs below; paho's network
thread records inbound bytes; the HTTP endpoint's thread reads. The
prometheus-client types are thread-safe, and the little state kept here
(the current round's tally) is touched by the service loop only.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter as PromCounter, Gauge, Histogram, Info
from prometheus_client import PlatformCollector, ProcessCollector

from device_agent import __version__
from device_agent.protocol.validation import RejectReason
from sdk.aggregator.outcomes import HandledUpdate, IntakeReason, Verdict

logger = logging.getLogger(__name__)

#: Every rejection reason an update (or aggregate) can get; series start at 0 so alerts see them from the first scrape.
REJECT_REASONS: tuple[str, ...] = tuple(r.value for r in RejectReason) + tuple(r.value for r in IntakeReason)
#: Why the inbox drops a message before opening it (:class:`~sdk.aggregator.inbox.FairInbox`).
INBOX_DROP_REASONS = ("rate_limited", "sender_queue_full", "inbox_full")
#: The service's own drops (:meth:`~sdk.aggregator.service_base.MqttAggregatorService.count`, the part before ``:``).
SERVICE_DROP_REASONS = ("unroutable_topic", "bad_chunk", "oversized", "subscription_refused", "handler_error",
                        "model_refused")
#: What inbound and outbound messages are, by the last segment of their topic; anything else is ``other``.
TOPIC_KINDS = ("update", "candidates", "receipt", "global", "aggregate", "other")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ROUND_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
_COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def topic_kind(topic: str) -> str:
    """The bounded label for ``topic``: its last segment when that is a known kind, else ``other``."""
    last = topic.rsplit("/", 1)[-1]
    return last if last in TOPIC_KINDS else "other"


@dataclass(frozen=True, kw_only=True)
class RoundTally:
    """What this process handled while round ``round`` was current: by verdict, and rejections by reason.

    ``duration_s`` None: the round opened before this process saw it (a restart), so its length is unknown.
    """

    round: int
    accepted: int
    duplicate: int
    rejected: dict[str, int]
    duration_s: float | None

    def describe(self) -> str:
        """One log fragment: ``5 accepted, 1 duplicate, 2 rejected (auth 1, stale_round 1)``."""
        total = sum(self.rejected.values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.rejected.items()))
        return f"{self.accepted} accepted, {self.duplicate} duplicate, {total} rejected" + (f" ({reasons})" if reasons else "")


class ServiceMetrics:
    """The metrics of one aggregator service (module docstring); ``registry`` is what its endpoint serves.

    ``tier`` is ``regional`` or ``root``; ``region`` None for the root. ``clock``
    (monotonic seconds) times rounds; ``wall_clock`` stamps the timestamp gauges.
    """

    def __init__(self, *, fleet: str, tier: str, region: str | None, member: str, bundle_version: int,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._wall_clock = wall_clock
        r = self.registry
        Info("fedge_aggregator", "Which aggregator this endpoint belongs to.", registry=r).info({
            "fleet": fleet, "tier": tier, "region": region or "", "member": member,
            "bundle_version": str(bundle_version), "version": __version__,
        })
        self.bundle_version = Gauge("fedge_bundle_version",
                                    "The bundle version this aggregator runs now (a release switches it at a round boundary).",
                                    registry=r)
        self.bundle_version.set(bundle_version)
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.broker_connected = Gauge("fedge_broker_connected", "1 while connected to the broker, else 0.", registry=r)
        self.broker_connects = PromCounter("fedge_broker_connects", "Accepted broker connections (first + reconnects).", registry=r)
        self.broker_disconnects = PromCounter("fedge_broker_disconnects", "Lost broker connections.", registry=r)
        self.received_messages = PromCounter("fedge_mqtt_received_messages", "MQTT messages (frames) received, by topic kind.",
                                             ["kind"], registry=r)
        self.received_bytes = PromCounter("fedge_mqtt_received_bytes", "Payload bytes received, by topic kind.", ["kind"], registry=r)
        self.sent_messages = PromCounter("fedge_mqtt_sent_messages", "MQTT messages (frames) published, by topic kind.",
                                         ["kind"], registry=r)
        self.sent_bytes = PromCounter("fedge_mqtt_sent_bytes", "Payload bytes published, by topic kind.", ["kind"], registry=r)
        self.accepted = PromCounter("fedge_updates_accepted", "Updates (aggregates at the root) counted.", registry=r)
        self.duplicates = PromCounter("fedge_updates_duplicate", "Resent updates already counted (acknowledged again).", registry=r)
        self.rejected = PromCounter("fedge_updates_rejected", "Updates not counted, by reason (docs/operations.md).",
                                    ["reason"], registry=r)
        self.receipt_latency = Histogram(
            "fedge_update_receipt_latency_seconds",
            "From the arrival of an update's last frame to its signed receipt handed to the MQTT client.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.round_current = Gauge("fedge_round_current", "The current round (-1 before the first).", registry=r)
        self.round_collecting = Gauge("fedge_round_collecting", "1 while the current round collects updates, 0 once closed.",
                                      registry=r)
        self.round_accepted = Gauge("fedge_round_accepted_updates", "Updates counted in the current round (all members).",
                                    registry=r)
        self.round_samples = Gauge("fedge_round_samples", "Samples counted in the current round (all members).", registry=r)
        self.round_started_at = Gauge("fedge_round_started_timestamp_seconds",
                                      "Unix time this process saw the current round open (0: before this process started).",
                                      registry=r)
        self.rounds_closed = PromCounter("fedge_rounds_closed", "Rounds this process closed.", registry=r)
        self.round_closed_at = Gauge("fedge_round_last_closed_timestamp_seconds", "Unix time of the last close by this process.",
                                     registry=r)
        self.round_duration = Histogram("fedge_round_duration_seconds", "From a round's opening to its close, as seen here.",
                                        buckets=_ROUND_BUCKETS, registry=r)
        self.closed_round = Gauge("fedge_closed_round", "The last round this process closed (-1: none yet).", registry=r)
        self.closed_round_updates = Gauge(
            "fedge_closed_round_updates",
            "Updates this process handled while the last closed round was current, by verdict and rejection reason.",
            ["verdict", "reason"], registry=r)
        self.store_commit = Histogram("fedge_store_commit_seconds", "Duration of each SQLite COMMIT of the aggregator store.",
                                      buckets=_COMMIT_BUCKETS, registry=r)
        self.inbox_dropped = PromCounter("fedge_inbox_dropped", "Messages dropped before opening (per-sender limits), by reason.",
                                         ["reason"], registry=r)
        self.inbox_pending = Gauge("fedge_inbox_pending_messages", "Messages waiting in the service's inbox.", registry=r)
        self.service_dropped = PromCounter(
            "fedge_service_dropped",
            "Messages the service itself dropped or could not handle (unroutable_topic, bad_chunk, oversized, "
            "subscription_refused, handler_error, model_refused).", ["reason"], registry=r)
        self.models_published = PromCounter("fedge_models_published", "Signed models published (retained).", registry=r)
        self.aggregates_forwarded = PromCounter("fedge_aggregates_forwarded", "Sealed aggregates sent to the root (first send).",
                                                registry=r)
        self.aggregates_resent = PromCounter("fedge_aggregates_resent", "Aggregates resent for want of the root's receipt.",
                                             registry=r)
        self.aggregates_acknowledged = PromCounter("fedge_aggregates_acknowledged", "Aggregates the root's receipt settled.",
                                                   registry=r)
        self.aggregate_pending = Gauge("fedge_aggregate_pending", "1 while a closed round's aggregate waits for the root's receipt.",
                                       registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        for reason in INBOX_DROP_REASONS:
            self.inbox_dropped.labels(reason=reason)
        for reason in SERVICE_DROP_REASONS:
            self.service_dropped.labels(reason=reason)
        for kind in TOPIC_KINDS:
            for family in (self.received_messages, self.received_bytes, self.sent_messages, self.sent_bytes):
                family.labels(kind=kind)
        self.round_current.set(-1)
        self.closed_round.set(-1)
        self._round: int | None = None
        self._looked = False
        self._opened_at: float | None = None
        self._tally: Counter[tuple[str, str]] = Counter()

    # -- transport ------------------------------------------------------------------------------

    def connected(self) -> None:
        """An accepted CONNACK."""
        self.broker_connects.inc()
        self.broker_connected.set(1)

    def disconnected(self) -> None:
        """The connection dropped."""
        self.broker_disconnects.inc()
        self.broker_connected.set(0)

    def message_received(self, topic: str, size: int) -> None:
        """One inbound frame (called from paho's network thread, before the inbox)."""
        kind = topic_kind(topic)
        self.received_messages.labels(kind=kind).inc()
        self.received_bytes.labels(kind=kind).inc(size)

    def message_sent(self, topic: str, size: int) -> None:
        """One frame handed to paho."""
        kind = topic_kind(topic)
        self.sent_messages.labels(kind=kind).inc()
        self.sent_bytes.labels(kind=kind).inc(size)

    def inbox_drops(self, reason: str, count: int) -> None:
        """``count`` messages the inbox dropped for ``reason``."""
        self.inbox_dropped.labels(reason=reason if reason in INBOX_DROP_REASONS else "other").inc(count)

    def service_drop(self, reason: str) -> None:
        """One message the service dropped; ``reason`` is a service counter name (its part before ``:``)."""
        self.service_dropped.labels(reason=reason.split(":", 1)[0]).inc()

    # -- intake ---------------------------------------------------------------------------------

    def update_handled(self, handled: HandledUpdate, *, arrived: float | None) -> None:
        """One whole update (or aggregate) through the intake; ``arrived``: when its last frame came (None: unknown)."""
        if handled.verdict is Verdict.ACCEPTED:
            self.accepted.inc()
            self._tally[("accepted", "")] += 1
        elif handled.verdict is Verdict.DUPLICATE:
            self.duplicates.inc()
            self._tally[("duplicate", "")] += 1
        else:
            reason = handled.reason if handled.reason in REJECT_REASONS else "other"
            self.rejected.labels(reason=reason).inc()
            self._tally[("rejected", reason)] += 1
        if handled.receipt is not None and arrived is not None:
            self.receipt_latency.observe(max(0.0, self._clock() - arrived))

    def store_committed(self, seconds: float) -> None:
        """One store COMMIT took ``seconds``."""
        self.store_commit.observe(seconds)

    # -- rounds ---------------------------------------------------------------------------------

    def round_seen(self, round: int | None, *, collecting: bool, accepted: int, samples: int) -> int | None:
        """Refresh the current-round gauges; a round number other than the last one seen opens a new tally.

        Returns the newly seen round (None when unchanged). A round already
        there at this process's first look has no opening time (its duration stays unknown).
        """
        self.round_current.set(-1 if round is None else round)
        self.round_collecting.set(1 if collecting else 0)
        self.round_accepted.set(accepted)
        self.round_samples.set(samples)
        first_look = not self._looked
        self._looked = True
        if round is None or round == self._round:
            return None
        self._round = round
        self._tally = Counter()
        self._opened_at = None if first_look else self._clock()
        self.round_started_at.set(0 if first_look else self._wall_clock())
        return round

    def round_closed(self, round: int) -> RoundTally:
        """This process closed ``round``: count it, time it, publish its tally in the ``fedge_closed_round*`` gauges."""
        duration = None if self._opened_at is None or round != self._round else self._clock() - self._opened_at
        self.rounds_closed.inc()
        self.round_closed_at.set(self._wall_clock())
        if duration is not None and math.isfinite(duration):
            self.round_duration.observe(duration)
        self.closed_round.set(round)
        tally = self.current_tally(round, duration)
        self._publish_tally(tally)
        return tally

    def current_tally(self, round: int, duration_s: float | None = None) -> RoundTally:
        """The tally of what this process handled since ``round`` (the current one) opened."""
        rejected = {reason: n for (verdict, reason), n in self._tally.items() if verdict == "rejected" and n}
        return RoundTally(round=round, accepted=self._tally[("accepted", "")], duplicate=self._tally[("duplicate", "")],
                          rejected=rejected, duration_s=duration_s)

    def _publish_tally(self, tally: RoundTally) -> None:
        self.closed_round_updates.labels(verdict="accepted", reason="").set(tally.accepted)
        self.closed_round_updates.labels(verdict="duplicate", reason="").set(tally.duplicate)
        for reason in _with_other(REJECT_REASONS):
            self.closed_round_updates.labels(verdict="rejected", reason=reason).set(tally.rejected.get(reason, 0))

    # -- models and forwarding ------------------------------------------------------------------

    def model_published(self) -> None:
        """A signed model went out (retained)."""
        self.models_published.inc()

    def aggregate_sent(self, *, resend: bool) -> None:
        """A sealed aggregate went to the root (``resend``: again, for want of a receipt)."""
        (self.aggregates_resent if resend else self.aggregates_forwarded).inc()
        self.aggregate_pending.set(1)

    def aggregate_settled(self, *, acknowledged: bool) -> None:
        """Nothing waits for the root any more (``acknowledged``: its receipt settled the aggregate)."""
        if acknowledged:
            self.aggregates_acknowledged.inc()
        self.aggregate_pending.set(0)


def _with_other(reasons: Iterable[str]) -> tuple[str, ...]:
    return (*reasons, "other")
