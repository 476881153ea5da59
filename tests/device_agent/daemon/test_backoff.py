"""Backoff delays: capped doubling, bounded jitter from an injected RNG, reset on success."""

from __future__ import annotations

import random

import pytest

from device_agent.daemon.backoff import Backoff, BackoffPolicy


class FixedRandom(random.Random):
    """An RNG whose ``random()`` always returns ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_doubles_up_to_the_cap_without_jitter():
    backoff = Backoff(BackoffPolicy(initial_s=0.5, max_s=5.0, jitter=0.0))
    assert [backoff.next_delay() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_backoff_jitter_shortens_each_delay_by_the_drawn_fraction():
    backoff = Backoff(BackoffPolicy(initial_s=1.0, max_s=10.0, jitter=0.5), rng=FixedRandom(0.5))
    assert [backoff.next_delay() for _ in range(6)] == [0.75, 1.5, 3.0, 6.0, 7.5, 7.5]


def test_backoff_sequence_is_reproducible_from_a_seeded_rng():
    policy = BackoffPolicy(initial_s=1.0, max_s=8.0, multiplier=3.0, jitter=1.0)
    first = Backoff(policy, rng=random.Random(42))
    second = Backoff(policy, rng=random.Random(42))
    draws = random.Random(42)
    expected = [ceiling * (1 - draws.random()) for ceiling in (1.0, 3.0, 8.0, 8.0)]
    assert [first.next_delay() for _ in range(4)] == pytest.approx(expected)
    assert [second.next_delay() for _ in range(4)] == pytest.approx(expected)


def test_backoff_delays_stay_within_the_jitter_band_and_under_the_cap():
    policy = BackoffPolicy(initial_s=0.1, max_s=2.0, jitter=0.3)
    backoff = Backoff(policy, rng=random.Random(1))
    for failures in range(1, 200):
        delay = backoff.next_delay()
        ceiling = policy.ceiling(failures)
        assert ceiling * 0.7 <= delay <= ceiling <= 2.0


def test_backoff_reset_on_success_starts_again_from_initial():
    backoff = Backoff(BackoffPolicy(initial_s=1.0, max_s=60.0, jitter=0.0))
    [backoff.next_delay() for _ in range(5)]
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.next_delay() == 1.0


def test_backoff_ceiling_does_not_overflow_after_a_very_long_outage():
    policy = BackoffPolicy(initial_s=1.0, max_s=300.0)
    assert policy.ceiling(100_000) == 300.0
    assert BackoffPolicy(initial_s=2.0, max_s=2.0, multiplier=1.0).ceiling(10**9) == 2.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(initial_s=0.0), "initial_s"),
    (dict(initial_s=5.0, max_s=1.0), "max_s"),
    (dict(multiplier=0.5), "multiplier"),
    (dict(jitter=1.5), "jitter"),
    (dict(jitter=float("nan")), "jitter"),
    (dict(initial_s=True), "initial_s"),
])
def test_backoff_policy_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BackoffPolicy(**kwargs)


def test_backoff_ceiling_needs_at_least_one_failure():
    with pytest.raises(ValueError):
        BackoffPolicy().ceiling(0)
