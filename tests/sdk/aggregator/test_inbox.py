"""The service inbox: per-sender token buckets before any cryptography, bounded queues, round-robin service."""

from __future__ import annotations

import threading

import pytest

from sdk.aggregator.inbox import FairInbox, InboxLimits
from tests.sdk.aggregator.scenario import StepClock


def _drain(inbox: FairInbox[str]) -> list[str]:
    out = []
    while (item := inbox.take(timeout=0.0)) is not None:
        out.append(item)
    return out


def test_inbox_one_flooding_sender_cannot_push_ahead_of_the_others() -> None:
    clock = StepClock()
    inbox: FairInbox[str] = FairInbox(InboxLimits(rate_per_s=1.0, burst=4), clock=clock)
    dropped = [inbox.offer("flooder", f"f{i}", 10) for i in range(10_000)]
    assert dropped[:4] == [None] * 4 and set(dropped[4:]) == {"rate_limited"}
    for name in ("a", "b", "c"):
        assert inbox.offer(name, f"{name}0", 10) is None
    # Round robin: after the flooder's first message, every honest sender's before its second.
    assert _drain(inbox) == ["f0", "a0", "b0", "c0", "f1", "f2", "f3"]
    assert inbox.drain_drops() == {("rate_limited", "flooder"): 9_996}
    assert inbox.drain_drops() == {}


def test_inbox_bucket_refills_at_the_rate_up_to_the_burst() -> None:
    clock = StepClock()
    inbox: FairInbox[str] = FairInbox(InboxLimits(rate_per_s=2.0, burst=3), clock=clock)
    assert [inbox.offer("d", str(i)) for i in range(4)] == [None, None, None, "rate_limited"]
    _drain(inbox)
    clock.advance(1.0)  # two tokens back
    assert [inbox.offer("d", str(i)) for i in range(3)] == [None, None, "rate_limited"]
    _drain(inbox)
    clock.advance(100.0)  # never more than the burst
    assert [inbox.offer("d", str(i)) for i in range(4)] == [None, None, None, "rate_limited"]


def test_inbox_control_lane_is_never_limited_and_served_first() -> None:
    inbox: FairInbox[str] = FairInbox(InboxLimits(rate_per_s=1.0, burst=1), clock=StepClock())
    assert inbox.offer("d", "update") is None
    for i in range(50):
        assert inbox.offer(None, f"event{i}") is None
    assert _drain(inbox) == [*(f"event{i}" for i in range(50)), "update"]


def test_inbox_bounds_the_bytes_waiting() -> None:
    inbox: FairInbox[str] = FairInbox(InboxLimits(rate_per_s=1.0, burst=100, max_pending_bytes=1000), clock=StepClock())
    assert inbox.offer("a", "a0", 600) is None
    assert inbox.offer("b", "b0", 600) == "inbox_full"
    assert inbox.take(timeout=0.0) == "a0"
    assert inbox.offer("b", "b0", 600) is None  # room again once taken


def test_inbox_take_waits_for_an_offer_from_another_thread() -> None:
    inbox: FairInbox[str] = FairInbox()
    threading.Timer(0.05, lambda: inbox.offer("d", "late")).start()
    assert inbox.take(timeout=5.0) == "late"
    assert inbox.take(timeout=0.01) is None


@pytest.mark.parametrize("fields", [{"rate_per_s": 0.0}, {"burst": 0}, {"max_pending_bytes": 0}, {"burst": True}])
def test_inbox_limits_refuse_bad_values(fields: dict) -> None:
    with pytest.raises(ValueError):
        InboxLimits(**fields)
