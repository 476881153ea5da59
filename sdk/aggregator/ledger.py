"""Counters that ride along with the aggregator's writes: the edge between in-memory counts and the store.

Rejections, duplicates, clipped updates and the like are counted in memory
and written with the next store transaction (:meth:`CounterLedger.write_transaction`)
or on :meth:`CounterLedger.flush_counters`, so a crash may lose a few
increments (metrics, not state) but never costs a write per rejected message.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from sdk.aggregator.store import AggregatorStore


class CounterLedger:
    """Pending counters over ``store`` (the base of the intake)."""

    def __init__(self, store: AggregatorStore) -> None:
        self._store = store
        self._pending: Counter[str] = Counter()

    @property
    def store(self) -> AggregatorStore:
        """The durable store this object writes to."""
        return self._store

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a counter; it reaches the store with the next write (or :meth:`flush_counters`)."""
        self._pending[name] += amount

    def counters(self) -> dict[str, int]:
        """Stored counters plus those not yet written."""
        merged = Counter(self._store.counters())
        merged.update(self._pending)
        return dict(sorted(merged.items()))

    def flush_counters(self) -> None:
        """Write pending counters now (one transaction)."""
        if +self._pending:
            with self.write_transaction():
                pass

    @contextmanager
    def write_transaction(self) -> Iterator[None]:
        """A store transaction that also writes the pending counters; they are cleared once it commits."""
        pending = +self._pending
        with self._store.transaction():
            yield
            self._store.add_counters(pending)
        self._pending.subtract(pending)
        self._pending = +self._pending
