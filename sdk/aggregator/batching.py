"""Group commit: which queued updates go through the intake together, and when a batch is due.

The intake (:meth:`~sdk.aggregator.intake.UpdateIntake.handle_batch`) opens,
validates and folds every update of a batch, commits them in ONE SQLite
transaction, and only then signs their receipts, so the fsync and the
O(model) running-sum write are paid once per batch instead of once per
update (Gray & Reuter's group commit; the same idea as PostgreSQL's
``commit_delay`` and InnoDB's binlog group commit).

This module holds the policy and nothing else (no I/O, an injected clock):

- a batch closes when it holds ``max_updates`` updates or ``max_bytes`` of
  sealed bytes (at least one update, whatever its size);
- it is also due once its first update has waited ``max_wait_s``: the
  latency cap. The service flushes as soon as its inbox has nothing more
  waiting *and* the cap has passed, so under light load an update waits at
  most ``max_wait_s`` before it is processed, and under load batches fill
  from the queue without waiting at all.

A receipt therefore leaves at most ``max_wait_s`` + the batch's processing
time (about ``max_updates`` x 1.8 ms of CPU at 100k parameters on a busy 2-core host,
docs/benchmarks.md) + one commit after
its update arrived. Defaults: 32 updates, 32 MiB, 5 ms (docs/aggregation.md,
"Group commit").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True)
class BatchLimits:
    """When a batch of updates is committed: ``max_updates`` or ``max_bytes`` reached, or its oldest
    update has waited ``max_wait_s`` (0: never wait for more). ``max_updates`` 1 turns group commit off."""

    max_updates: int = 32
    max_bytes: int = 32 * 1024 * 1024
    max_wait_s: float = 0.005

    def __post_init__(self) -> None:
        for name, high in (("max_updates", 4096), ("max_bytes", 1 << 40)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{name} must be an integer in 1..{high}, got {value!r}")
        wait = self.max_wait_s
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not (math.isfinite(wait) and 0 <= wait <= 1.0):
            raise ValueError(f"max_wait_s must be a number in [0, 1], got {wait!r}")


@dataclass(frozen=True, kw_only=True)
class IncomingUpdate:
    """One sealed update as received: its bytes and the sender its topic names (None: unchecked)."""

    blob: bytes | bytearray | memoryview
    topic_sender: str | None = None


class UpdateBatch(Generic[_T]):
    """Items waiting to go through the intake together (see the module docstring). Not thread-safe:
    the service loop alone adds and drains."""

    def __init__(self, limits: BatchLimits = BatchLimits(), *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._items: list[_T] = []
        self._bytes = 0
        self._first_at: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: _T, size: int) -> bool:
        """Queue ``item`` of ``size`` bytes; True when the batch is now full (drain it)."""
        if not self._items:
            self._first_at = self._clock()
        self._items.append(item)
        self._bytes += size
        return self.full

    @property
    def full(self) -> bool:
        """True once ``max_updates`` items or ``max_bytes`` bytes are queued."""
        return len(self._items) >= self.limits.max_updates or self._bytes >= self.limits.max_bytes

    def due_in(self) -> float | None:
        """Seconds until the latency cap of the oldest item passes (0: due now); None when empty."""
        if self._first_at is None:
            return None
        return max(0.0, self._first_at + self.limits.max_wait_s - self._clock())

    def due(self) -> bool:
        """True when the batch is full or its oldest item has waited ``max_wait_s``; False when empty."""
        wait = self.due_in()
        return wait is not None and (wait == 0.0 or self.full)

    def drain(self) -> list[_T]:
        """Every queued item, oldest first; the batch is empty afterwards."""
        items, self._items = self._items, []
        self._bytes, self._first_at = 0, None
        return items
