"""The root aggregator on the root broker (see :mod:`sdk.aggregator.service_base` for the loop).

Regions' aggregates (bridged out from the regional brokers) arrive on
``region/+/up/aggregate``; each authenticated one is answered with the root's
signed receipt on ``region/<region>/down/receipt`` (bridged in to that
region), so a region resends until it hears one. The round closes when the
aggregator's policy says so: every expected region reported (quorum), or the
deadline passed, whatever arrived by then (the root never waits longer: a
lost aggregate delays the federation by at most one deadline). The next
signed global model is published retained on ``root/model/global``.

It logs (INFO) each aggregate's fate and each close with its tally, and
records its Prometheus metrics (:mod:`sdk.aggregator.metrics`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from device_agent.protocol.topics import TopicLayout
from sdk.aggregator.inbox import InboxLimits
from device_agent.release.carry import carry_parameters
from device_agent.release.release_info import SharedStart
from sdk.aggregator.follower import VersionFollower
from sdk.aggregator.metrics import ServiceMetrics
from sdk.aggregator.outcomes import AggregatorStatus
from sdk.aggregator.root import RootAggregator, VersionSwitch
from sdk.aggregator.service_base import MqttAggregatorService, ServiceReport
from sdk.aggregator.service_config import BrokerSettings, LoopSettings

logger = logging.getLogger(__name__)


class RootService(MqttAggregatorService):
    """The root aggregator on the root broker (module docstring).

    ``initial_params``: round 0's global model, started when the store has no
    round yet (None: wait for an operator to start one). Every connect
    republishes the current model (retained). ``metrics`` None makes its own.
    ``follower``: follow the fleet's releases (None: run the configured bundle
    for good): when the federation's version changes and its bundle is in the
    library, the next close starts the new version (docs/rollout.md, "Version
    switch at a round boundary").
    """

    def __init__(self, aggregator: RootAggregator, *, layout: TopicLayout, broker: BrokerSettings,
                 loop: LoopSettings = LoopSettings(), initial_params: Mapping[str, np.ndarray] | None = None,
                 clock: Callable[[], float] = time.monotonic, inbox: InboxLimits | None = None,
                 metrics: ServiceMetrics | None = None, follower: VersionFollower | None = None) -> None:
        self.aggregator = aggregator
        self._initial = initial_params
        self.follower = follower
        if metrics is None:
            metrics = ServiceMetrics(fleet=layout.fleet, tier="root", region=None, member=aggregator.member,
                                     bundle_version=aggregator.config.bundle_version, clock=clock)
        super().__init__(layout=layout, broker=broker, loop=loop, clock=clock, inbox=inbox, metrics=metrics)
        aggregator.observe_commits(metrics.store_committed)
        if follower is not None:
            follower.attach(self.subscribe_topics, self.unsubscribe_topics)

    def subscriptions(self) -> Sequence[str]:
        """The region aggregate filter (shared when a group is set) and, following releases, their metadata."""
        return (self.group_filter(self.layout.all_region_aggregates),) + (
            self.follower.subscriptions if self.follower is not None else ())

    def sender_of(self, topic: str) -> str | None:
        """Aggregates are rate-limited per region (the bridge ACL confines a region to its own uplink)."""
        return self.layout.region_of(topic)

    def expected_update_bytes(self) -> int:
        """One sealed aggregate, at most (without its contributor list)."""
        return self.aggregator.update_bytes_bound()

    def describe(self) -> str:
        """``root aggregator`` (and the member when not ``main``)."""
        member = self.aggregator.member
        return "root aggregator" + ("" if member == "main" else f" ({member})")

    def round_status(self) -> AggregatorStatus:
        """The aggregator's status."""
        return self.aggregator.status()

    def bootstrap_round(self) -> None:
        """Start round 0 from ``initial_params`` when no round exists yet; otherwise nothing."""
        if self._initial is not None and self.aggregator.current_model() is None:
            self.aggregator.start_round(0, self._initial)

    def run(self, stop_event: threading.Event, max_seconds: float | None = None) -> ServiceReport:
        """Bootstrap round 0 if needed, then serve (see :meth:`MqttAggregatorService.run`)."""
        self.refresh_round(force=True)  # before the bootstrap: a round 0 started now has a known opening time
        self.bootstrap_round()
        self.refresh_round(force=True)
        return super().run(stop_event, max_seconds)

    def on_connected(self, first: bool) -> None:
        """Republish the current global model (retained)."""
        model = self.aggregator.current_model()
        if model is not None and self.publish(self.layout.root_model, model, retain=True):
            self.metrics.model_published()

    def handle_message(self, topic: str, payload: bytes) -> None:
        """Take one region's (possibly chunked) aggregate and answer it with a signed receipt (or file a release message)."""
        if self.follower is not None and self.follower.handles(topic):
            self.follower.handle(topic, payload)
            return
        region = self.layout.region_of(topic)
        if region is None or topic != self.layout.region_aggregate(region):
            self.count("unroutable_topic")
            logger.warning("ignoring a message on %s", topic)
            return
        self.take_aggregate(payload, child=region,
                            handle=lambda blob: self.aggregator.handle_aggregate(blob, topic_region=region))

    def on_tick(self) -> None:
        """Expire stale chunks; follow releases; close the round (switching versions when due) and publish the
        next global model when it should close."""
        self._reassembler.expire()
        if self.follower is not None:
            self.follower.step()
        reason = self.aggregator.close_reason()
        if reason is not None:
            before = self.aggregator.status()
            model = self.aggregator.close_round(switch=self.switch_due())
            closed = -1 if before.round is None else before.round
            tally = self.metrics.round_closed(closed)
            took = "" if tally.duration_s is None else f" after {tally.duration_s:.1f} s"
            logger.info("%s: round %d closed (%s)%s: %s from regions; %d samples", self.describe(), closed, reason.value,
                        took, tally.describe(), before.samples)
            if self.publish(self.layout.root_model, model, retain=True):
                self.metrics.model_published()
            self.metrics.bundle_version.set(self.aggregator.bundle_version)
            self.refresh_round(force=True)

    def switch_due(self) -> VersionSwitch | None:
        """The switch to make at this close: the federation's version differs and its bundle is in the library."""
        follower = self.follower
        if follower is None:
            return None
        version = follower.desired_version()
        if version is None or version == self.aggregator.bundle_version or follower.library.get(version) is None:
            return None
        config = follower.library.config_for(self.aggregator.config, version)
        initial = follower.library.initial_shared(version)
        carry = follower.shared_start(version) is SharedStart.CARRY
        old_version = self.aggregator.bundle_version

        def start(old: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if not carry:
                logger.warning("bundle v%d starts from its own initial weights", version)
                return initial
            carried = carry_parameters(old, initial)
            logger.warning("bundle v%d starts from the v%d global model where it carries over: %s", version, old_version,
                           carried.summary())
            return carried.params

        return VersionSwitch(config=config, start=start)

    def flush_counters(self) -> None:
        """Write the aggregator's pending rejection counters."""
        self.aggregator.flush_counters()
