"""A middle tier on its own broker (see :mod:`sdk.aggregator.service_base` for the loop).

Towards its parent it behaves as :class:`~sdk.aggregator.regional_service.RegionalService`:
the parent's model arrives on ``root/model/global`` (the bridge of this
broker maps the parent's served ``model/global`` there, or brings the
root's model in unchanged right below the root), the model it serves its
children is published retained on ``model/global``, and its sealed
aggregate goes to ``region/<id>/up/aggregate``, resent with capped backoff
until the parent's signed receipt arrives on ``region/<id>/down/receipt``.

Towards its children it behaves as :class:`~sdk.aggregator.root_service.RootService`:
the children's aggregates (bridged out from their brokers) arrive on
``region/+/up/aggregate`` and each authenticated one is answered with this
tier's signed receipt on ``region/<child>/down/receipt``, which the child's
bridge carries back. Its own aggregate comes back to it on the same filter
(MQTT 3.1.1 has no "no local"): it is recognised by its topic and skipped. With ``follower`` it follows the fleet's releases and
switches bundle version at a round boundary exactly as a region does
(docs/rollout.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from device_agent.protocol.topics import TopicLayout
from sdk.aggregator.follower import VersionFollower
from sdk.aggregator.inbox import InboxLimits
from sdk.aggregator.metrics import ServiceMetrics
from sdk.aggregator.middle import MiddleAggregator
from sdk.aggregator.regional_service import RegionalService
from sdk.aggregator.service_config import BrokerSettings, LoopSettings


class MiddleService(RegionalService):
    """A middle tier on its broker (module docstring); ``metrics`` None makes its own (tier label ``middle``)."""

    def __init__(self, aggregator: MiddleAggregator, *, region: str, layout: TopicLayout, broker: BrokerSettings,
                 loop: LoopSettings = LoopSettings(), clock: Callable[[], float] = time.monotonic,
                 inbox: InboxLimits | None = None, metrics: ServiceMetrics | None = None,
                 follower: VersionFollower | None = None) -> None:
        if metrics is None:
            metrics = ServiceMetrics(fleet=layout.fleet, tier="middle", region=region, member=aggregator.member,
                                     bundle_version=aggregator.config.bundle_version, clock=clock)
        super().__init__(aggregator, region=region, layout=layout, broker=broker, loop=loop, clock=clock, inbox=inbox,
                         metrics=metrics, follower=follower)
        self.middle = aggregator

    def describe(self) -> str:
        """``middle aggregator <id>`` (and the member when not ``main``)."""
        member = self.aggregator.member
        return f"middle aggregator {self.region}" + ("" if member == "main" else f" ({member})")

    def subscriptions(self) -> Sequence[str]:
        """The children's aggregate filter (shared when a group is set), the parent's model and the parent's
        receipts for this tier (direct: every member hears them) and, following releases, their metadata."""
        topics = (self.group_filter(self.layout.all_region_aggregates), self.layout.root_model,
                  self.layout.region_receipt(self.region))
        return topics + (self.follower.subscriptions if self.follower is not None else ())

    def sender_of(self, topic: str) -> str | None:
        """Aggregates are rate-limited per child; the parent's model and receipts (and this tier's own
        aggregate coming back) use the control lane."""
        child = self.layout.region_of(topic)
        return None if child == self.region else child

    def handle_message(self, topic: str, payload: bytes) -> None:
        """Route one message: a child's (possibly chunked) aggregate here; the parent's model and receipts (and
        anything else) as a region routes them; this tier's own aggregate, delivered back, is skipped."""
        child = self.layout.region_of(topic)
        if child is None or topic != self.layout.region_aggregate(child):
            super().handle_message(topic, payload)
            return
        if child == self.region:
            return  # our own aggregate, delivered back by the broker
        self.take_aggregate(payload, child=child, handle=lambda blob: self.middle.handle_aggregate(blob, topic_child=child))
