"""What the intake caches of its store, and the round phases written through that cache.

The store is the authority; :class:`RoundCache` keeps the current round, this
member's running sum (a :class:`~sdk.aggregation.StreamingWeightedMean`) and the replay
window, and reloads them when the store's round marker changes or a write
failed. Every write re-checks the marker inside its transaction, so several
members sharing one store never fold into a round another member has closed.
The pipeline itself is :class:`~sdk.aggregator.intake.UpdateIntake`, a subclass.
"""

from __future__ import annotations

import logging

import numpy as np

from device_agent.errors import RejectedUpdateError
from device_agent.protocol.validation import ReplayWindow
from sdk.aggregation import AggregationConfig, StreamingWeightedMean
from sdk.aggregation.influence import InfluencePolicy, RoundBounds, first_bounds, next_bounds
from sdk.aggregator.admission import largest_magnitude
from sdk.aggregator.config import AggregatorConfig
from sdk.aggregator.ledger import CounterLedger
from sdk.aggregator.merge import MergedRound, merge_round
from sdk.aggregator.records import PartialSum, ReplaySnapshot, RoundMarker, RoundRecord
from sdk.aggregator.round_state import CloseReason, RoundState, RoundStatus
from sdk.aggregator.store import AggregatorStore

logger = logging.getLogger(__name__)


class RoundCache(CounterLedger):
    """The cached round of one aggregator member over ``store`` (see the module docstring).

    ``aggregation``: how updates combine (the mean streams; the buffered rules keep each delta).
    ``influence``: how each round's bounds are set (None: no bounds, as at the root).
    """

    def __init__(self, *, config: AggregatorConfig, store: AggregatorStore, aggregation: AggregationConfig,
                 influence: InfluencePolicy | None) -> None:
        super().__init__(store)
        self._config = config
        self._aggregation = aggregation
        self._influence = influence
        self._loaded = False
        self._marker: RoundMarker | None = None
        self._record: RoundRecord | None = None
        self._state: RoundState | None = None
        self._partial = PartialSum()
        self._rule: StreamingWeightedMean | None = None
        self._window = ReplayWindow(rounds=config.replay_rounds)
        self._window_seq = 0
        self._base_largest = 0.0
        self.refresh()

    @property
    def record(self) -> RoundRecord | None:
        """The cached current round (None before the first); call :meth:`refresh` first for the latest."""
        return self._record

    def refresh(self) -> None:
        """Reload the cached round when the store's marker moved (another member, or a failed write)."""
        marker = self._store.round_marker()
        if self._loaded and marker == self._marker:
            return
        record = None if marker is None else self._store.load_round()
        same_round = record is not None and self._state is not None and record.round == self._state.round
        state: RoundState | None = None
        partial = PartialSum()
        if record is not None:
            accepted, samples = self._store.round_totals(record.round)
            # A restart re-arms the deadline from now: it can extend a round, never cut it short.
            opened_at = self._state.opened_at if same_round and self._state is not None else self._config.clock()
            state = RoundState(
                round=record.round,
                status=record.status,
                policy=self._config.policy,
                opened_at=opened_at,
                accepted=accepted,
                samples=samples,
            )
            partial = self._store.load_partial(record.round) or PartialSum()
        self._record, self._state, self._partial = record, state, partial
        #: max |x| over the round's base model: admission's float32-range check reads it per update.
        self._base_largest = 0.0 if record is None else largest_magnitude(record.base_params)
        self._rule = self._mean_rule()
        if same_round:
            self._catch_up()
        else:
            self._load_window()
        self._marker = None if record is None else RoundMarker(round=record.round, status=record.status)
        self._loaded = True

    @property
    def bounds(self) -> RoundBounds | None:
        """The cached round's influence bounds (None without a policy; the first-round bounds for a round stored without)."""
        if self._influence is None or self._record is None:
            return None
        return self._record.bounds if self._record.bounds is not None else first_bounds(self._influence)

    def _clip_norm(self) -> float | None:
        bounds = self.bounds
        return None if bounds is None else bounds.clip_norm

    def _mean_rule(self) -> StreamingWeightedMean | None:
        if self._aggregation.rule != "mean":
            return None  # buffered rules keep each delta in the store and replay them at close
        if self._partial.state.count == 0:
            return StreamingWeightedMean(expected_shapes=self._config.shapes)
        return StreamingWeightedMean.from_state(self._partial.state)  # the intake clips before folding

    def _load_window(self) -> None:
        snapshot = self._store.replay_snapshot()
        if snapshot is None:
            self._window, self._window_seq = ReplayWindow(rounds=self._config.replay_rounds), 0
        else:
            self._window, self._window_seq = ReplayWindow.from_state(snapshot.state), snapshot.seq
        self._catch_up()

    def _catch_up(self) -> None:
        """Replay accepted rows committed since the window last looked (by any member)."""
        for key in self._store.accepted_since(self._window_seq):
            try:
                self._window.record(key.sender, key.round, key.nonce)
            except RejectedUpdateError as exc:  # the window dropped that round or is full; the accepted table still guards it
                logger.debug("replay window skipped accepted row %d: %s", key.seq, exc)
            self._window_seq = key.seq

    # -- round phases (the callers run these inside write_transaction) ---------

    def write_round_start(self, *, previous: RoundRecord | None, round: int, global_params: dict[str, np.ndarray],
                          base_params: dict[str, np.ndarray], model_blob: bytes, fresh_bounds: bool = False) -> None:
        """Make ``round`` current in the store, with a replay-window snapshot advanced to it and its influence
        bounds (from ``previous``, the round being left, and the norms and counts of its accepted updates;
        ``fresh_bounds``: the first round's bounds, as after a switch to another bundle version)."""
        self._catch_up()
        window = ReplayWindow.from_state(self._window.export_state())
        window.advance(round)
        bounds = self._next_bounds(None if fresh_bounds else previous)
        if previous is not None and previous.closing is not None and previous.closing.result_blob is not None \
                and previous.forward is None:
            self._pending["aggregate_unacknowledged"] += 1
            logger.warning("round %d's aggregate was never acknowledged by the tier above: it moved on to round %d",
                           previous.round, round)
        self._store.begin_round(
            round=round,
            global_params=global_params,
            base_params=base_params,
            model_blob=model_blob,
            replay=ReplaySnapshot(state=window.export_state(), seq=self._window_seq),
            keep_accepted_from=window.floor,
            bounds=bounds,
        )
        if bounds is not None:
            logger.info("round %d bounds: norm %s, weight cap %d", round,
                        "unbounded (unsafe)" if bounds.clip_norm is None else f"{bounds.clip_norm:.4g}", bounds.weight_cap)
        self._loaded = False

    def _next_bounds(self, previous: RoundRecord | None) -> RoundBounds | None:
        policy = self._influence
        if policy is None:
            return None
        if previous is None or previous.bounds is None:
            return first_bounds(policy)
        norms, counts = self._store.round_statistics(previous.round)
        return next_bounds(policy, previous.bounds, norms=norms, sample_counts=counts)

    def merge(self, round: int) -> MergedRound:
        """Every member's share of ``round`` combined by the aggregation rule (a fixed order, so reproducible)."""
        return merge_round(self._store, round, aggregation=self._aggregation, shapes=self._config.shapes,
                           clip_norm=self._clip_norm())

    def close_reason(self) -> CloseReason | None:
        """Why the current round should close now (None: keep collecting, closed, or no round)."""
        self.refresh()
        if self._state is None or self._state.status is not RoundStatus.COLLECTING:
            return None
        accepted, samples = self._store.round_totals(self._state.round)
        self._state = self._state.with_totals(accepted=accepted, samples=samples)
        return self._state.close_reason(self._config.clock())

    @property
    def state(self) -> RoundState | None:
        """The cached round state (None before the first round)."""
        return self._state
