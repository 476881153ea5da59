"""The regional and root aggregators: transport-agnostic, durable, exactly-once.

Bytes in, bytes out; an MQTT service wraps them. Every batch of accepted updates
is one SQLite transaction (their accepted rows and the new running sum together;
group commit, receipts signed after it), so a crash loses nothing that was acknowledged and a resend is never counted
twice. See docs/aggregation.md for the round lifecycle, the durability
argument, the mixing definition and how several processes share a region.

- :mod:`~sdk.aggregator.round_state`: the pure round state machine (quorum, deadline, stale rounds).
- :mod:`~sdk.aggregator.store` / :mod:`~sdk.aggregator.records`: the SQLite edge (WAL, ``synchronous=FULL``) and its records.
- :mod:`~sdk.aggregator.intake`: open -> deduplicate -> validate -> bound -> fold -> commit -> receipt
  (:mod:`~sdk.aggregator.admission` bounds and range checks, :mod:`~sdk.aggregator.ledger` counters,
  :mod:`~sdk.aggregator.merge` the close's arithmetic, :mod:`~sdk.aggregator.contributors` the root's device lists).
- :mod:`~sdk.aggregator.forwarding`: the root's signed answer to a region's aggregate.
- :mod:`~sdk.aggregator.inbox`: the services' per-sender rate limits and fair queue.
- :mod:`~sdk.aggregator.batching`: when queued updates are committed together (size and latency caps).
- :mod:`~sdk.aggregator.tier` / :mod:`~sdk.aggregator.config`: what both tiers share.
- :mod:`~sdk.aggregator.regional` / :mod:`~sdk.aggregator.root`: the two tiers.
- :mod:`~sdk.aggregator.middle`: a tier between them (children's aggregates in, one aggregate out), for any depth.
- :mod:`~sdk.aggregator.candidates`: FedFomo's pool of device models (pure, in memory).
- :mod:`~sdk.aggregator.outcomes` / :mod:`~sdk.aggregator.errors`: results and errors.
"""

from __future__ import annotations

from sdk.aggregator.batching import BatchLimits, IncomingUpdate
from sdk.aggregator.candidates import Candidate, CandidatePool
from sdk.aggregator.config import AggregatorConfig
from sdk.aggregator.errors import AggregatorError, ModelRejectedError, RoundStateError, StoreError
from sdk.aggregator.forwarding import ForwardAnswer
from sdk.aggregator.middle import MiddleAggregator, MiddleConfig
from sdk.aggregator.outcomes import AggregatorStatus, HandledUpdate, IntakeReason, Verdict
from sdk.aggregator.regional import CandidateAnswer, RegionalAggregate, RegionalAggregator, RegionalConfig
from sdk.aggregator.root import RootAggregator, RootConfig
from sdk.aggregator.round_state import CloseReason, RoundPolicy, RoundState, RoundStatus
from sdk.aggregator.store import AggregatorStore

__all__ = [
    "AggregatorConfig",
    "AggregatorError",
    "AggregatorStatus",
    "AggregatorStore",
    "BatchLimits",
    "Candidate",
    "CandidateAnswer",
    "CandidatePool",
    "CloseReason",
    "ForwardAnswer",
    "HandledUpdate",
    "IncomingUpdate",
    "IntakeReason",
    "MiddleAggregator",
    "MiddleConfig",
    "ModelRejectedError",
    "RegionalAggregate",
    "RegionalAggregator",
    "RegionalConfig",
    "RootAggregator",
    "RootConfig",
    "RoundPolicy",
    "RoundState",
    "RoundStatus",
    "RoundStateError",
    "StoreError",
    "Verdict",
]
