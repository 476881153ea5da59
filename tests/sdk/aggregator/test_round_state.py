"""The pure round state machine: quorum, deadline, admission of updates."""

from __future__ import annotations

import pytest

from device_agent.errors import RejectedUpdateError
from sdk.aggregator import CloseReason, RoundPolicy, RoundState, RoundStateError, RoundStatus


def _round(quorum: int = 3, deadline_s: float = 10.0, min_updates: int = 1) -> RoundState:
    return RoundState.open(round=4, policy=RoundPolicy(quorum=quorum, deadline_s=deadline_s, min_updates=min_updates), now=100.0)


def test_round_state_closes_at_quorum_before_the_deadline() -> None:
    state = _round(quorum=3)
    assert state.close_reason(100.0) is None
    state = state.with_totals(accepted=2, samples=40)
    assert not state.should_close(105.0)
    state = state.with_totals(accepted=3, samples=60)
    assert state.close_reason(105.0) is CloseReason.QUORUM


def test_round_state_closes_at_the_deadline_only_with_min_updates() -> None:
    state = _round(quorum=10, deadline_s=10.0, min_updates=2)
    assert state.deadline == 110.0
    assert state.close_reason(109.999) is None
    assert state.close_reason(500.0) is None  # past the deadline but empty: never closes empty
    state = state.with_totals(accepted=1, samples=7)
    assert state.close_reason(500.0) is None
    state = state.with_totals(accepted=2, samples=9)
    assert state.close_reason(109.0) is None
    assert state.close_reason(110.0) is CloseReason.DEADLINE


def test_round_state_admits_only_the_current_collecting_round() -> None:
    state = _round()
    state.check_admission(4)
    with pytest.raises(RejectedUpdateError) as stale:
        state.check_admission(3)
    assert stale.value.reason == "stale_round"
    with pytest.raises(RejectedUpdateError) as future:
        state.check_admission(5)
    assert future.value.reason == "future_round"
    closed = state.closed()
    assert closed.status is RoundStatus.CLOSED
    assert closed.close_reason(1e9) is None
    with pytest.raises(RejectedUpdateError) as late:
        closed.check_admission(4)
    assert late.value.reason == "stale_round"


def test_round_state_cannot_close_twice() -> None:
    with pytest.raises(RoundStateError):
        _round().closed().closed()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(quorum=0, deadline_s=1.0),
        dict(quorum=2, deadline_s=0.0),
        dict(quorum=2, deadline_s=float("inf")),
        dict(quorum=2, deadline_s=1.0, min_updates=3),
        dict(quorum=True, deadline_s=1.0),
    ],
)
def test_round_policy_refuses_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RoundPolicy(**kwargs)


def test_round_state_refuses_negative_round() -> None:
    with pytest.raises(ValueError):
        RoundState.open(round=-1, policy=RoundPolicy(quorum=1, deadline_s=1.0), now=0.0)
