"""Capped exponential backoff with jitter, reset on success, and a report throttle (pure: no sleeping here).

The n-th consecutive failure waits ``min(max_s, initial_s * multiplier**n)``
shortened by a random fraction of up to ``jitter`` of itself, so a fleet of
devices that lost the same broker does not come back in lockstep. With
``jitter`` 1 this is AWS's "full jitter"; with 0 it is deterministic. The
delay never exceeds ``max_s``. The random source is injected, so tests see
an exact sequence.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class BackoffPolicy:
    """Delays between retries: ``initial_s`` after the first failure, growing by ``multiplier`` up to ``max_s``.

    ``jitter`` in [0, 1] is the largest fraction by which a delay is randomly shortened.
    """

    initial_s: float = 1.0
    max_s: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        for name in ("initial_s", "max_s", "multiplier", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.initial_s <= 0:
            raise ValueError(f"initial_s must be > 0, got {self.initial_s}")
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s ({self.max_s}) must be >= initial_s ({self.initial_s})")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must lie in [0, 1], got {self.jitter}")

    def ceiling(self, failures: int) -> float:
        """The delay before jitter after ``failures`` consecutive failures (``failures`` >= 1)."""
        if failures < 1:
            raise ValueError("failures must be >= 1")
        # Compare exponents instead of computing multiplier**n, which overflows for long outages.
        if self.multiplier > 1 and failures - 1 >= math.log(self.max_s / self.initial_s, self.multiplier):
            return self.max_s
        return min(self.max_s, self.initial_s * self.multiplier ** (failures - 1))


class Backoff:
    """The running state of one retry loop: call :meth:`next_delay` after each failure, :meth:`reset` on success.

    ``rng`` None uses a private :class:`random.Random` seeded from the OS.
    Not thread-safe: each loop owns its own instance.
    """

    def __init__(self, policy: BackoffPolicy, *, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._rng = rng if rng is not None else random.Random()
        self.failures = 0

    def next_delay(self) -> float:
        """Count one more failure and return how long to wait before the next try."""
        self.failures += 1
        ceiling = self.policy.ceiling(self.failures)
        return ceiling * (1.0 - self.policy.jitter * self._rng.random())

    def reset(self) -> None:
        """Success: the next failure starts again from ``initial_s``."""
        self.failures = 0


class Throttle:
    """Rate limit for a repeated report: the first event is reported, then at most one per ``interval_s``.

    :meth:`ready` counts an event and says whether to report it now, with how
    many events were held back since the last report. ``clock`` is monotonic
    seconds (injectable, like everything that waits here).
    """

    def __init__(self, interval_s: float, *, clock: Callable[[], float]) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._held = 0

    def ready(self) -> tuple[bool, int]:
        """Count one event: (report it now?, events held back since the last report)."""
        now = self._clock()
        if self._last is None or now - self._last >= self.interval_s:
            held, self._held, self._last = self._held, 0, now
            return True, held
        self._held += 1
        return False, self._held

    def clear(self) -> None:
        """The condition ended (e.g. connected again): the next event is reported at once."""
        self._last = None
        self._held = 0
