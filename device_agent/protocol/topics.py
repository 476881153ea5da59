"""MQTT topic layout: the one place that names every topic fedge uses.

Layout on a regional broker (``{fleet}`` and ``{region}`` are configuration;
``{device}`` is the device id, which is also its MQTT username so that
Mosquitto ACL ``pattern`` lines with ``%u`` confine a device to its own topics)::

    fedge/{fleet}/dev/{device}/up/update      device -> regional aggregator (sealed update or chunks)
    fedge/{fleet}/dev/{device}/up/candidates  device -> regional aggregator (signed FedFomo candidate request)
    fedge/{fleet}/dev/{device}/down/receipt   regional aggregator -> device (signed receipt)
    fedge/{fleet}/dev/{device}/down/candidates regional aggregator -> device (FedFomo candidate models)
    fedge/{fleet}/dev/{device}/status         device -> anyone allowed to read it: signed status, retained; the
                                              last will is a signed offline status (device_agent.protocol.status)
    fedge/{fleet}/dev/{device}/presence       legacy plain online/offline flag (agents before the status topic)
    fedge/{fleet}/model/global                regional aggregator -> devices, retained signed model
    fedge/{fleet}/region/{region}/up/aggregate regional aggregator -> root (bridged out to the root broker)
    fedge/{fleet}/region/{region}/down/receipt root -> regional aggregator (signed receipt, bridged in)
    fedge/{fleet}/region/{region}/bridge/state retained bridge up/down flag (Mosquitto notifications)
    fedge/{fleet}/region/{region}/dev/{device}/status  a device's status as the root broker holds it (bridged
                                              out from its region, which the topic names)
    fedge/{fleet}/root/model/global           root -> regional aggregators (bridged in from the root broker)
    fedge/{fleet}/release/metadata/{file}     release tool -> everyone: retained TUF metadata (bridged in, read-only)
    fedge/{fleet}/release/targets/{sha256}/{i} release tool -> everyone: retained bundle chunks (bridged in, read-only)

A device may write only under ``dev/{device}/up/``, its status and its
presence topic and read only ``dev/{device}/down/#``, ``model/#`` and
``release/#``; it can never publish a model or a release. Statuses are
bridged to the root under their region's subtree, so a region's bridge can
write only its own devices' statuses there.
Aggregators use shared subscriptions (``$share/{group}/...``) on the
update topic so several aggregator processes can split one region's load.
"""

from __future__ import annotations

from dataclasses import dataclass

_FORBIDDEN = set("/+#\x00")


def _check_segment(kind: str, value: str) -> str:
    if not value or any(ch in _FORBIDDEN for ch in value) or value.startswith("$"):
        raise ValueError(f"{kind} {value!r} is not a valid topic segment (no '/', '+', '#', NUL, or leading '$')")
    return value


@dataclass(frozen=True, kw_only=True)
class TopicLayout:
    """Topic names for one fleet. ``fleet`` must be a single topic segment."""

    fleet: str
    root_prefix: str = "fedge"

    def __post_init__(self) -> None:
        _check_segment("fleet", self.fleet)
        _check_segment("root prefix", self.root_prefix)

    @property
    def base(self) -> str:
        """Prefix shared by every topic of this fleet."""
        return f"{self.root_prefix}/{self.fleet}"

    def device_update(self, device: str) -> str:
        """Where a device publishes its sealed updates."""
        return f"{self.base}/dev/{_check_segment('device id', device)}/up/update"

    def device_candidate_request(self, device: str) -> str:
        """Where a device asks its region for FedFomo candidate models."""
        return f"{self.base}/dev/{_check_segment('device id', device)}/up/candidates"

    def device_receipt(self, device: str) -> str:
        """Where the aggregator answers a device with a receipt."""
        return f"{self.base}/dev/{_check_segment('device id', device)}/down/receipt"

    def device_candidates(self, device: str) -> str:
        """Where the aggregator serves FedFomo candidate models to one device."""
        return f"{self.base}/dev/{_check_segment('device id', device)}/down/candidates"

    def device_presence(self, device: str) -> str:
        """Legacy retained presence flag of one device (``online``/``offline``); agents now publish :meth:`device_status`."""
        return f"{self.base}/dev/{_check_segment('device id', device)}/presence"

    def device_status(self, device: str) -> str:
        """Retained, signed status of one device on its regional broker (its last will is a signed offline status)."""
        return f"{self.base}/dev/{_check_segment('device id', device)}/status"

    def region_device_status(self, region: str, device: str) -> str:
        """A device's status as bridged to the root broker, under its region."""
        return f"{self.base}/region/{_check_segment('region', region)}/dev/{_check_segment('device id', device)}/status"

    @property
    def all_device_statuses(self) -> str:
        """Subscription filter matching every device's status on a regional broker."""
        return f"{self.base}/dev/+/status"

    @property
    def all_region_statuses(self) -> str:
        """Subscription filter matching every device's status on the root broker."""
        return f"{self.base}/region/+/dev/+/status"

    def status_source(self, topic: str) -> tuple[str | None, str] | None:
        """(region or None, device) named by a status topic (regional or root form); None for any other topic."""
        parts = topic.split("/")
        base = self.base.split("/")
        n = len(base)
        if parts[:n] != base or parts[-1:] != ["status"]:
            return None
        rest = parts[n:]
        if len(rest) == 3 and rest[0] == "dev":
            return None, rest[1]
        if len(rest) == 5 and rest[0] == "region" and rest[2] == "dev":
            return rest[1], rest[3]
        return None

    @property
    def global_model(self) -> str:
        """Retained, signed model that devices of a region train from."""
        return f"{self.base}/model/global"

    @property
    def global_model_delta(self) -> str:
        """Retained, signed delta from the previous model to :attr:`global_model` (when the region sends deltas)."""
        return f"{self.base}/model/delta"

    def region_aggregate(self, region: str) -> str:
        """Where a regional aggregator sends its sealed aggregate to the root."""
        return f"{self.base}/region/{_check_segment('region', region)}/up/aggregate"

    def region_receipt(self, region: str) -> str:
        """Where the root answers a region's aggregate with a signed receipt (bridged in to the region)."""
        return f"{self.base}/region/{_check_segment('region', region)}/down/receipt"

    def region_bridge_state(self, region: str) -> str:
        """Retained up/down state of a region's bridge to the root (set by Mosquitto)."""
        return f"{self.base}/region/{_check_segment('region', region)}/bridge/state"

    @property
    def root_model(self) -> str:
        """Where the root publishes the signed global model for the regions."""
        return f"{self.base}/root/model/global"

    def release_metadata(self, name: str) -> str:
        """Retained TUF metadata file ``name`` (``timestamp.json``, ``3.snapshot.json``...); ``""`` gives the prefix."""
        return f"{self.base}/release/metadata/{_check_segment('metadata file', name) if name else ''}"

    @property
    def release_metadata_filter(self) -> str:
        """Subscription filter matching every release metadata file."""
        return f"{self.base}/release/metadata/#"

    def release_chunk(self, sha256: str, index: int) -> str:
        """Retained chunk ``index`` of the bundle whose SHA-256 is ``sha256`` (content-addressed)."""
        return f"{self.release_chunk_prefix()}{_check_segment('bundle hash', sha256)}/{int(index)}"

    def release_chunk_prefix(self) -> str:
        """The prefix of every release chunk topic."""
        return f"{self.base}/release/targets/"

    @property
    def release_filter(self) -> str:
        """Every release topic (metadata and chunks): what bridges carry down and devices may read."""
        return f"{self.base}/release/#"

    @property
    def all_device_updates(self) -> str:
        """Subscription filter matching every device's updates."""
        return f"{self.base}/dev/+/up/update"

    @property
    def all_candidate_requests(self) -> str:
        """Subscription filter matching every device's candidate requests."""
        return f"{self.base}/dev/+/up/candidates"

    @property
    def all_region_aggregates(self) -> str:
        """Subscription filter matching every region's aggregate."""
        return f"{self.base}/region/+/up/aggregate"

    def shared(self, group: str, topic_filter: str) -> str:
        """A shared-subscription filter so several processes split one stream."""
        return f"$share/{_check_segment('share group', group)}/{topic_filter}"

    def device_of(self, topic: str) -> str | None:
        """The device id in a ``dev/{device}/...`` topic, or None for any other topic."""
        parts = topic.split("/")
        base = self.base.split("/")
        if len(parts) > len(base) + 2 and parts[: len(base)] == base and parts[len(base)] == "dev":
            return parts[len(base) + 1]
        return None

    def region_of(self, topic: str) -> str | None:
        """The region in a ``region/{region}/...`` topic, or None for any other topic."""
        parts = topic.split("/")
        base = self.base.split("/")
        if len(parts) > len(base) + 2 and parts[: len(base)] == base and parts[len(base)] == "region":
            return parts[len(base) + 1]
        return None
