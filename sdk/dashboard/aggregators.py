"""What the dashboard reads from an aggregator's ``/metrics`` (pure: text in, a frozen reading out).

The names are those of :mod:`sdk.aggregator.metrics`. The tally of each
closed round comes from the ``fedge_closed_round*`` gauges, which a service
sets when it closes a round: :class:`RoundLog` keeps one per round number it
sees there, so a round shorter than the scrape interval can be missed (the
counters stay exact; docs/operations.md).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


class MetricsParseError(ValueError):
    """The endpoint answered something that is not the Prometheus text format of a fedge aggregator."""


@dataclass(frozen=True, kw_only=True)
class ClosedRoundTally:
    """What one aggregator process handled while round ``round`` was current (rejections by reason)."""

    round: int
    accepted: int
    duplicate: int
    rejected: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AggregatorReading:
    """One scrape of one aggregator: identity (from ``fedge_aggregator_info``), round gauges, totals.

    ``round`` is None before the first round; ``closed`` None before this
    process closed any round.
    """

    tier: str
    region: str
    member: str
    fleet: str
    bundle_version: str
    connected: bool
    round: int | None
    collecting: bool
    round_accepted: int
    round_samples: int
    rounds_closed: int
    closed: ClosedRoundTally | None
    aggregate_pending: bool
    accepted_total: int
    rejected_total: dict[str, int]
    inbox_dropped_total: int
    service_dropped_total: int
    last_closed_at: float | None

    @property
    def name(self) -> str:
        """``root`` or ``region <name>`` (with the member when not ``main``)."""
        base = "root" if self.tier == "root" else f"region {self.region}"
        return base if self.member == "main" else f"{base} ({self.member})"


def parse_metrics(text: str) -> AggregatorReading:
    """Read a scrape's text; MetricsParseError when it is not a fedge aggregator's."""
    values: dict[str, float] = {}
    rejected: dict[str, int] = {}
    closed_rejected: dict[str, int] = {}
    closed_by_verdict: dict[str, int] = {}
    info: dict[str, str] | None = None
    dropped = 0
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, sample.value
                if name == "fedge_aggregator_info":
                    info = dict(labels)
                elif name == "fedge_updates_rejected_total":
                    rejected[labels.get("reason", "other")] = int(value)
                elif name == "fedge_closed_round_updates":
                    if labels.get("verdict") == "rejected":
                        closed_rejected[labels.get("reason", "other")] = int(value)
                    else:
                        closed_by_verdict[labels.get("verdict", "")] = int(value)
                elif name == "fedge_inbox_dropped_total":
                    dropped += int(value)
                elif name == "fedge_service_dropped_total":
                    values[name] = values.get(name, 0.0) + value
                elif not labels:
                    values[name] = value
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise MetricsParseError(f"not the Prometheus text format: {exc}") from exc
    if info is None or info.get("tier") not in ("regional", "root"):
        raise MetricsParseError("no fedge_aggregator_info: not a fedge aggregator's endpoint")
    current = int(values.get("fedge_round_current", -1))
    closed = int(values.get("fedge_closed_round", -1))
    last_closed = values.get("fedge_round_last_closed_timestamp_seconds", 0.0)
    return AggregatorReading(
        tier=info["tier"], region=info.get("region", ""), member=info.get("member", "main"), fleet=info.get("fleet", ""),
        bundle_version=info.get("bundle_version", ""),
        connected=values.get("fedge_broker_connected", 0.0) >= 1,
        round=None if current < 0 else current,
        collecting=values.get("fedge_round_collecting", 0.0) >= 1,
        round_accepted=int(values.get("fedge_round_accepted_updates", 0)),
        round_samples=int(values.get("fedge_round_samples", 0)),
        rounds_closed=int(values.get("fedge_rounds_closed_total", 0)),
        closed=None if closed < 0 else ClosedRoundTally(
            round=closed, accepted=closed_by_verdict.get("accepted", 0), duplicate=closed_by_verdict.get("duplicate", 0),
            rejected={reason: n for reason, n in closed_rejected.items() if n}),
        aggregate_pending=values.get("fedge_aggregate_pending", 0.0) >= 1,
        accepted_total=int(values.get("fedge_updates_accepted_total", 0)),
        rejected_total={reason: n for reason, n in rejected.items() if n},
        inbox_dropped_total=dropped,
        service_dropped_total=int(values.get("fedge_service_dropped_total", 0)),
        last_closed_at=last_closed or None,
    )


class RoundLog:
    """The tallies of the last ``limit`` closed rounds of one aggregator, by round number."""

    def __init__(self, limit: int = 200) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._limit = limit
        self._rounds: OrderedDict[int, ClosedRoundTally] = OrderedDict()

    def take(self, reading: AggregatorReading) -> bool:
        """Record the reading's closed-round tally; True when it was new or changed."""
        tally = reading.closed
        if tally is None or self._rounds.get(tally.round) == tally:
            return False
        self._rounds[tally.round] = tally
        self._rounds = OrderedDict(sorted(self._rounds.items()))
        while len(self._rounds) > self._limit:
            self._rounds.popitem(last=False)
        return True

    def tallies(self) -> list[ClosedRoundTally]:
        """Oldest first."""
        return list(self._rounds.values())
