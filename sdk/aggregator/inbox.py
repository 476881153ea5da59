"""The aggregator service's inbox: per-sender rate limits applied before any cryptography, and fair service.

paho's network thread calls :meth:`FairInbox.offer` for every message; the
service loop calls :meth:`FairInbox.take`. The topic names the sender (the
broker's ACL binds ``dev/<id>/...`` to the account ``<id>``), so a flooding
account is recognised without opening anything:

- each sender has a token bucket (``burst`` messages, refilled at
  ``rate_per_s``); a message finding it empty is dropped on the spot
  (``rate_limited``), costing the aggregator a dictionary lookup, never a
  signature check;
- each sender holds at most ``burst`` waiting messages (``sender_queue_full``)
  and all waiting messages together at most ``max_pending_bytes``
  (``inbox_full``);
- :meth:`take` serves the control lane (connection events, the root's model,
  receipts: ``sender`` None) first, then the senders round robin, one message
  each: an honest device's update waits behind at most one message of every
  other sender, however many a flooder sent.

Drops are counted by reason and by sender (:meth:`drain_drops`) so the
service can log who is flooding. Thread-safe; the clock is injectable.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

_T = TypeVar("_T")
_MAX_BUCKETS = 200_000


@dataclass(frozen=True, kw_only=True)
class InboxLimits:
    """Per-sender limits: ``rate_per_s`` messages per second on average, bursts of up to ``burst``;
    ``max_pending_bytes`` over every waiting message (control messages included)."""

    rate_per_s: float = 1.0
    burst: int = 32
    max_pending_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if not (isinstance(self.rate_per_s, (int, float)) and math.isfinite(self.rate_per_s) and self.rate_per_s > 0):
            raise ValueError(f"rate_per_s must be positive and finite, got {self.rate_per_s!r}")
        for name in ("burst", "max_pending_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class FairInbox(Generic[_T]):
    """A bounded, rate-limited, round-robin queue of ``(sender, item)`` (see the module docstring)."""

    def __init__(self, limits: InboxLimits = InboxLimits(), *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._control: deque[tuple[_T, int]] = deque()
        self._queues: OrderedDict[str, deque[tuple[_T, int]]] = OrderedDict()
        self._buckets: dict[str, _Bucket] = {}
        self._bytes = 0
        self._drops: Counter[tuple[str, str]] = Counter()

    def offer(self, sender: str | None, item: _T, size: int = 0) -> str | None:
        """Queue ``item`` from ``sender`` (None: the control lane, never rate-limited); the drop reason, or None when queued."""
        with self._lock:
            if sender is not None:
                reason = self._admit(sender)
                if reason is None and len(self._queues.get(sender, ())) >= self.limits.burst:
                    reason = "sender_queue_full"
                if reason is None and self._bytes + size > self.limits.max_pending_bytes:
                    reason = "inbox_full"
                if reason is not None:
                    self._drops[(reason, sender)] += 1
                    return reason
                self._queues.setdefault(sender, deque()).append((item, size))
            else:
                self._control.append((item, size))
            self._bytes += size
            self._ready.notify()
            return None

    def take(self, timeout: float) -> _T | None:
        """The next item (control lane first, then one sender after another), waiting up to ``timeout`` s; None if none came."""
        with self._lock:
            if not self._control and not self._queues:
                self._ready.wait(timeout)
            if self._control:
                item, size = self._control.popleft()
            elif self._queues:
                sender, queue = next(iter(self._queues.items()))
                item, size = queue.popleft()
                del self._queues[sender]
                if queue:
                    self._queues[sender] = queue  # to the back of the rotation
            else:
                return None
            self._bytes -= size
            return item

    def pending(self) -> int:
        """How many items wait (both lanes)."""
        with self._lock:
            return len(self._control) + sum(len(q) for q in self._queues.values())

    def drain_drops(self) -> Counter[tuple[str, str]]:
        """(reason, sender) -> messages dropped since the last call."""
        with self._lock:
            drops, self._drops = self._drops, Counter()
            return drops

    def _admit(self, sender: str) -> str | None:
        now = self._clock()
        bucket = self._buckets.get(sender)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._forget_full_buckets(now)
            bucket = self._buckets[sender] = _Bucket(float(self.limits.burst), now)
        else:
            bucket.tokens = min(float(self.limits.burst), bucket.tokens + (now - bucket.stamp) * self.limits.rate_per_s)
            bucket.stamp = now
        if bucket.tokens < 1.0:
            return "rate_limited"
        bucket.tokens -= 1.0
        return None

    def _forget_full_buckets(self, now: float) -> None:
        """A bucket that has refilled is the same as no bucket: drop those (bounds memory across many senders)."""
        refill = self.limits.burst / self.limits.rate_per_s
        for sender in [s for s, b in self._buckets.items() if now - b.stamp >= refill and s not in self._queues]:
            del self._buckets[sender]
