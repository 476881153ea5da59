"""Errors raised by the aggregators (all derive from :class:`~device_agent.errors.FedgeError`).

A rejected *update* is not an error: :meth:`RegionalAggregator.handle_update`
returns it as data. These exceptions are for the aggregator's own state and
for models arriving from the tier above, which have one sender and no receipt.
"""

from __future__ import annotations

from device_agent.errors import FedgeError


class AggregatorError(FedgeError):
    """Base class of the aggregator errors."""


class RoundStateError(AggregatorError):
    """The requested phase does not fit the round's state (no round started yet)."""


class ModelRejectedError(AggregatorError):
    """An authentic model from the tier above was refused; ``reason`` is a short code.

    Codes: ``auth`` (signature did not verify; nothing more is said),
    ``malformed``, ``stale_round`` (older than the current round: no
    rollback), ``fleet``, ``region`` (not a global model), ``bundle_version``,
    ``params`` (names, shapes or finiteness differ from the bundle's shared parameters).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class StoreError(AggregatorError):
    """The durable store cannot be used: another aggregator's file, a newer schema, a member already running."""
