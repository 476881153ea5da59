"""parse_metrics reads what ServiceMetrics writes; RoundLog keeps one tally per closed round."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from sdk.aggregator.metrics import ServiceMetrics
from sdk.aggregator.outcomes import HandledUpdate, Verdict
from sdk.dashboard.aggregators import MetricsParseError, RoundLog, parse_metrics


def _metrics() -> ServiceMetrics:
    now = [100.0]
    return ServiceMetrics(fleet="f", tier="regional", region="eu", member="m2", bundle_version=4, clock=lambda: now[0],
                          process_metrics=False)


def test_parse_metrics_reads_a_service_registry() -> None:
    m = _metrics()
    m.connected()
    m.round_seen(None, collecting=False, accepted=0, samples=0)
    m.round_seen(7, collecting=True, accepted=2, samples=30)
    for verdict, reason in ((Verdict.ACCEPTED, ""), (Verdict.ACCEPTED, ""), (Verdict.REJECTED, "replay"),
                            (Verdict.DUPLICATE, "")):
        m.update_handled(HandledUpdate(verdict=verdict, reason=reason), arrived=None)
    reading = parse_metrics(generate_latest(m.registry).decode())
    assert (reading.tier, reading.region, reading.member, reading.bundle_version) == ("regional", "eu", "m2", "4")
    assert reading.name == "region eu (m2)" and reading.connected and reading.round == 7 and reading.collecting
    assert (reading.round_accepted, reading.round_samples, reading.accepted_total) == (2, 30, 2)
    assert reading.rejected_total == {"replay": 1} and reading.closed is None and reading.rounds_closed == 0

    tally = m.round_closed(7)
    assert tally.accepted == 2 and tally.duplicate == 1 and tally.rejected == {"replay": 1}
    assert tally.describe() == "2 accepted, 1 duplicate, 1 rejected (replay 1)"
    closed = parse_metrics(generate_latest(m.registry).decode()).closed
    assert closed is not None and (closed.round, closed.accepted, closed.duplicate, closed.rejected) == (7, 2, 1, {"replay": 1})


@pytest.mark.parametrize("text", ["", "# HELP x y\nx 1\n", "not { prometheus", "fedge_aggregator_info{tier=\"x\"} 1\n"])
def test_parse_metrics_refuses_what_is_not_an_aggregator(text: str) -> None:
    with pytest.raises(MetricsParseError):
        parse_metrics(text)


def test_round_log_keeps_the_last_rounds() -> None:
    m, log = _metrics(), RoundLog(limit=2)
    for r in range(4):
        m.round_seen(r, collecting=True, accepted=0, samples=0)
        m.round_closed(r)
        assert log.take(parse_metrics(generate_latest(m.registry).decode()))
    assert not log.take(parse_metrics(generate_latest(m.registry).decode()))  # unchanged
    assert [t.round for t in log.tallies()] == [2, 3]
