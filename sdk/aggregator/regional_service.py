"""A region's aggregator on its regional broker (see :mod:`sdk.aggregator.service_base` for the loop).

Devices' updates arrive through the shared subscription (or a direct one when
``broker.share_group`` is None); each gets its signed receipt on
``dev/<id>/down/receipt``. The root's model (bridged in) starts a round and
the region's signed model is published retained on ``model/global``. When the
round should close, the sealed aggregate goes to ``region/<region>/up/aggregate``
and is **resent with capped backoff until the root's signed receipt** arrives
on ``region/<region>/down/receipt`` (bridged in) or the root's next model
starts another round: the region-to-root leg follows the device-to-region
pattern (durable pending message, resend, signed receipt, exactly-once
intake). With FedFomo on it also answers candidate requests.

It logs (INFO) each round it sees open and each close with its tally, the
forwarding and resends, and records its Prometheus metrics
(:mod:`sdk.aggregator.metrics`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from device_agent.daemon.backoff import Backoff, BackoffPolicy
from device_agent.errors import FedgeError
from device_agent.protocol.envelope import verified_model_header
from device_agent.protocol.topics import TopicLayout
from sdk.aggregator.batching import IncomingUpdate, UpdateBatch
from sdk.aggregator.downlink import DownlinkSettings, ModelPublisher
from sdk.aggregator.errors import ModelRejectedError
from sdk.aggregator.follower import VersionFollower
from sdk.aggregator.inbox import InboxLimits
from sdk.aggregator.metrics import ServiceMetrics
from sdk.aggregator.outcomes import AggregatorStatus, HandledUpdate
from sdk.aggregator.regional import RegionalAggregator
from sdk.aggregator.service_base import MqttAggregatorService
from sdk.aggregator.service_config import BrokerSettings, LoopSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class _Queued:
    """A whole device update waiting for its batch: ``arrived`` is when its last frame came (receipt latency)."""

    blob: bytes
    device: str
    arrived: float | None


class RegionalService(MqttAggregatorService):
    """A region's aggregator on its regional broker (module docstring); ``metrics`` None makes its own."""

    def __init__(self, aggregator: RegionalAggregator, *, region: str, layout: TopicLayout, broker: BrokerSettings,
                 loop: LoopSettings = LoopSettings(), clock: Callable[[], float] = time.monotonic,
                 inbox: InboxLimits | None = None, metrics: ServiceMetrics | None = None,
                 follower: VersionFollower | None = None, downlink: DownlinkSettings | None = None,
                 downlink_state: Path | None = None) -> None:
        if downlink is not None and downlink.compression.enabled and aggregator.fomo_enabled:
            raise ValueError("model deltas down and FedFomo cannot be combined: FedFomo's pool rebuilds device models "
                             "from the model the region served, which devices following deltas do not hold exactly")
        self.aggregator = aggregator
        #: Model deltas down and the round's uplink override (None or inactive: the stored model as it is).
        self.publisher = None if downlink is None or not downlink.active else ModelPublisher(
            downlink, signing_key=aggregator.config.signing_key, clock=aggregator.config.wall_clock, state=downlink_state)
        self.region = region
        #: Follows the fleet's releases (None: the configured bundle for good); a root model of another
        #: version switches the region at that round boundary once its bundle is in the library.
        self.follower = follower
        self._waiting_model: tuple[bytes, int] | None = None
        if metrics is None:
            metrics = ServiceMetrics(fleet=layout.fleet, tier="regional", region=region, member=aggregator.member,
                                     bundle_version=aggregator.config.bundle_version, clock=clock)
        super().__init__(layout=layout, broker=broker, loop=loop, clock=clock, inbox=inbox, metrics=metrics)
        aggregator.observe_commits(metrics.store_committed)
        if aggregator.pending_aggregate() is not None:
            metrics.aggregate_pending.set(1)
        if follower is not None:
            follower.attach(self.subscribe_topics, self.unsubscribe_topics)
        self._resend = Backoff(BackoffPolicy(initial_s=loop.resend_min_s, max_s=loop.resend_max_s))
        self._resend_at: float | None = None
        self._batch: UpdateBatch[_Queued] = UpdateBatch(loop.batch_limits(), clock=clock)

    def expected_update_bytes(self) -> int:
        """One sealed update of this bundle's shared parameters, at most."""
        return self.aggregator.update_bytes_bound()

    def describe(self) -> str:
        """``regional aggregator <region>`` (and the member when not ``main``)."""
        member = self.aggregator.member
        return f"regional aggregator {self.region}" + ("" if member == "main" else f" ({member})")

    def round_status(self) -> AggregatorStatus:
        """The aggregator's status."""
        return self.aggregator.status()

    def subscriptions(self) -> Sequence[str]:
        """The device update filter (shared when a group is set), the root model and the root's receipts for this
        region (direct: every member hears them) and, with FedFomo on, the candidate request filter."""
        topics = [self.group_filter(self.layout.all_device_updates), self.layout.root_model,
                  self.layout.region_receipt(self.region)]
        if self.aggregator.fomo_enabled:
            topics.append(self.group_filter(self.layout.all_candidate_requests))
        if self.follower is not None:
            topics.extend(self.follower.subscriptions)
        return tuple(topics)

    def sender_of(self, topic: str) -> str | None:
        """Device topics are rate-limited per device; the root's model and receipts use the control lane."""
        return self.layout.device_of(topic)

    def on_connected(self, first: bool) -> None:
        """Republish the current model (retained) and, when the root has not answered it yet, the stored aggregate."""
        model = self.aggregator.current_model()
        if model is not None:
            self.publish_model(model)
        if self.aggregator.pending_aggregate() is not None:
            self._resend_at = self._clock()  # a reconnect may have lost what was in flight: resend now

    def handle_message(self, topic: str, payload: bytes) -> None:
        """Route one message: the root's model or receipt, a device's (possibly chunked) update or request."""
        if topic == self.layout.root_model:
            self.handle_root_model(payload)
            return
        if self.follower is not None and self.follower.handles(topic):
            self.follower.handle(topic, payload)
            return
        if topic == self.layout.region_receipt(self.region):
            answer = self.aggregator.handle_root_receipt(payload)
            if answer.settled:
                self._resend_at = None
                self._resend.reset()
                self.metrics.aggregate_settled(acknowledged=True)
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
            self._batch.add(_Queued(blob=blob, device=device, arrived=self.arrived), len(blob))

    def handle_candidate_request(self, payload: bytes, *, device: str) -> None:
        """Answer a device's FedFomo request with its sealed candidates, chunked to fit (nothing for a refused request)."""
        answer = self.aggregator.handle_candidate_request(payload, topic_device=device)
        if answer.blob is not None:
            self.publish(self.layout.device_candidates(device), answer.blob, chunk=True)

    def handle_root_model(self, blob: bytes) -> None:
        """Start the round of the root's model and publish the region's signed model retained."""
        # Updates that arrived before the next round's model are decided in their round (here, not in handle_message:
        # the tick also starts a model that waited for its bundle).
        self.flush_batch(force=True)
        try:
            model = self.aggregator.handle_root_model(blob)
        except ModelRejectedError as exc:
            if exc.reason == "bundle_version" and self._switch_for(blob):
                self.handle_root_model(blob)
                return
            self.count(f"model_refused:{exc.reason}")  # the aggregator counted and logged it as well
            return
        self._waiting_model = None
        self.publish_model(model)
        if self.aggregator.pending_aggregate() is None:
            self._resend_at = None
            self._resend.reset()
            self.metrics.aggregate_settled(acknowledged=False)
        self.refresh_round(force=True)

    def publish_model(self, blob: bytes) -> None:
        """Publish the round's model retained on ``model/global``; with a publisher, what it makes of it: the delta
        first on ``model/delta`` (an empty retained message clears a stale one when the chain starts over)."""
        if self.publisher is not None:
            published = self.publisher.prepare(blob)
            blob = published.full
            if self.publisher.settings.compression.enabled:
                self.publish(self.layout.global_model_delta, published.delta or b"", retain=True)
        if self.publish(self.layout.global_model, blob, retain=True):
            self.metrics.model_published()

    def batch_due_in(self) -> float | None:
        """Seconds until the queued updates' latency cap passes; None when none are queued."""
        return self._batch.due_in()

    def flush_batch(self, *, force: bool = False) -> None:
        """Group commit: hand the queued updates to the aggregator together once the batch is full, or its
        latency cap has passed and nothing else waits in the inbox (``force``: now); then send their receipts."""
        batch = self._batch
        if not len(batch) or not (force or batch.full or (batch.due() and self.inbox.pending() == 0)):
            return
        queued = batch.drain()
        answers = self.aggregator.handle_updates([IncomingUpdate(blob=q.blob, topic_sender=q.device) for q in queued])
        for q, handled in zip(queued, answers):
            self.send_receipt(q.device, handled, arrived=q.arrived)
        self.on_tick()  # a quorum may have just been reached

    def handle_update(self, blob: bytes, *, device: str) -> HandledUpdate:
        """Hand one whole update to the aggregator at once (no batch) and send its receipt."""
        handled = self.aggregator.handle_update(blob, topic_device=device)
        self.send_receipt(device, handled, arrived=self.arrived)
        self.on_tick()  # a quorum may have just been reached
        return handled

    def send_receipt(self, device: str, handled: HandledUpdate, *, arrived: float | None) -> None:
        """Publish a handled update's signed receipt (none for unauthenticated input) and record its metrics."""
        if handled.receipt is not None:
            self.publish(self.layout.device_receipt(device), handled.receipt)
        self.metrics.update_handled(handled, arrived=arrived)

    def _switch_for(self, blob: bytes) -> bool:
        """A root model names another bundle version: adopt it if its bundle is in the library (True), else
        keep the model and fetch that version (a release carries it); the round starts once it is here."""
        if self.follower is None:
            return False
        try:
            version = verified_model_header(blob, trusted_signers=self.aggregator.config.root_verify_key).bundle_version
        except FedgeError:
            return False
        if self.follower.library.get(version) is None:
            if self._waiting_model is None:
                logger.warning("region %s: the root runs bundle v%d, which is not here yet; fetching it", self.region,
                               version)
            self._waiting_model = (blob, version)
            self.follower.want(version)
            return False
        self._waiting_model = None
        self.aggregator.adopt(self.follower.library.config_for(self.aggregator.config, version))
        self.metrics.bundle_version.set(version)
        return True

    def on_tick(self) -> None:
        """Expire stale chunks; follow releases (a root model waiting for its bundle is taken once it is here);
        close the round when it should close; resend an unanswered aggregate when due."""
        self._reassembler.expire()
        if self.follower is not None:
            self.follower.step()
            waiting = self._waiting_model
            if waiting is not None and self.follower.library.get(waiting[1]) is not None:
                self._waiting_model = None
                self.handle_root_model(waiting[0])
        if self.aggregator.should_close():
            self.forward_aggregate()
        elif self._resend_at is not None and self._clock() >= self._resend_at:
            pending = self.aggregator.pending_aggregate()
            if pending is None:
                self._resend_at = None
                self._resend.reset()
            else:
                self._send_aggregate(pending, resend=True)

    def forward_aggregate(self) -> None:
        """Close the round (idempotent) and publish the sealed aggregate, chunked to fit; nothing for an empty round."""
        reason = self.aggregator.close_reason()
        aggregate = self.aggregator.close_round()
        tally = self.metrics.round_closed(aggregate.round)
        self.refresh_round(force=True)
        took = "" if tally.duration_s is None else f" after {tally.duration_s:.1f} s"
        logger.info("%s: round %d closed (%s)%s: %s; %d samples", self.describe(), aggregate.round,
                    "closed elsewhere" if reason is None else reason.value, took, tally.describe(), aggregate.sample_count)
        if aggregate.blob is None:
            logger.warning("region %s round %d closed without updates: nothing to forward", self.region, aggregate.round)
            return
        pending = self.aggregator.pending_aggregate()
        if pending is None:
            return  # the root has already answered this round's aggregate
        if self._send_aggregate(pending, resend=False):
            logger.info("region %s forwarded round %d: %d updates, %d samples",
                        self.region, aggregate.round, aggregate.update_count, aggregate.sample_count)

    def _send_aggregate(self, blob: bytes, *, resend: bool) -> bool:
        sent = self.publish(self.layout.region_aggregate(self.region), blob, chunk=True)
        if sent:
            self.metrics.aggregate_sent(resend=resend)
        if resend:
            self.count("aggregate_resent", drop=False)
            logger.info("region %s: no receipt from the root yet, aggregate resent (attempt %d)", self.region,
                        self._resend.failures + 1)
        self._resend_at = self._clock() + self._resend.next_delay()
        return sent

    def flush_counters(self) -> None:
        """Write the aggregator's pending rejection counters."""
        self.aggregator.flush_counters()
