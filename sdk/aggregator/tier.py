"""What the regional aggregator and the root share: starting rounds, signing models, status.

A round starts when a model for it arrives (the root's global model at a
region; a bootstrap or the root's own close at the root). Starting is
idempotent for the current round (a retained model redelivered after a
reconnect gets the same signed answer back), refuses older rounds
(``stale_round``: no rollback), and abandons a round still collecting when
a newer one starts (its accepted updates are counted as
``abandoned_updates`` and logged: the tier above moved on without them).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Self, TypeVar

import numpy as np

from device_agent.protocol.envelope import sign_model, verified_model_header
from device_agent.protocol.headers import ModelHeader
from sdk.aggregator.config import AggregatorConfig, conform_params
from sdk.aggregator.errors import ModelRejectedError
from sdk.aggregator.intake import UpdateIntake
from sdk.aggregator.outcomes import AggregatorStatus
from sdk.aggregator.records import RoundRecord
from sdk.aggregator.round_state import CloseReason, RoundStatus
from sdk.aggregator.store import AggregatorStore

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Given the stored round (None before the first), the new round and its global model:
#: the model the new round's deltas are relative to, and its signed form to publish.
ServeModel = Callable[[RoundRecord | None, int, dict[str, np.ndarray]], tuple[dict[str, np.ndarray], bytes]]


def open_with_store(path: str | os.PathLike[str], *, identity: str, member: str, build: Callable[[AggregatorStore], _T]) -> _T:
    """Open the store at ``path`` and ``build`` an aggregator on it; the store is closed again if that fails."""
    store = AggregatorStore.open(path, identity=identity, member=member)
    try:
        return build(store)
    except BaseException:
        store.close()
        raise


class AggregatorTier:
    """Base of :class:`~sdk.aggregator.regional.RegionalAggregator` and :class:`~sdk.aggregator.root.RootAggregator`."""

    def __init__(self, *, config: AggregatorConfig, intake: UpdateIntake, identity: str) -> None:
        self._config = config
        self._intake = intake
        self._identity = identity
        self._closed = False

    @property
    def config(self) -> AggregatorConfig:
        """The configuration in force (it changes when the aggregator adopts another bundle version)."""
        return self._config

    @property
    def bundle_version(self) -> int:
        """The bundle version this aggregator runs (every update must name it)."""
        return self._config.bundle_version

    def adopt(self, config: AggregatorConfig) -> None:
        """Run another bundle version from now on (``config``: this one with another spec and bundle version).

        Called at a round boundary (docs/rollout.md, "Version switch at a round
        boundary"); the store and every durable record stay, only what an update
        must look like changes. TypeError for another kind of config.
        """
        if type(config) is not type(self._config):
            raise TypeError(f"config must be a {type(self._config).__name__}")
        logger.warning("switching from bundle v%d to v%d", self._config.bundle_version, config.bundle_version)
        self._config = config
        self._intake = self._make_intake(config)

    def _make_intake(self, config: AggregatorConfig) -> UpdateIntake:
        raise NotImplementedError

    def model_version(self, blob: bytes) -> int:
        """The bundle version named by a model this aggregator signed (verified with its own key)."""
        return verified_model_header(blob, trusted_signers=self._config.signing_key.public_key()).bundle_version

    def stored_version(self) -> int | None:
        """The bundle version of the stored current round (None before the first): what a restart must run."""
        model = self.current_model()
        return None if model is None else self.model_version(model)

    @property
    def identity(self) -> str:
        """The sender id this aggregator signs as (receipts, models, aggregates)."""
        return self._identity


    @property
    def member(self) -> str:
        """This process's member name in the shared store."""
        return self._intake.store.member

    def observe_commits(self, observer: Callable[[float], None] | None) -> None:
        """Call ``observer`` with the seconds each store COMMIT takes (None: stop); for the services' metrics."""
        self._intake.store.commit_observer = observer

    def observe_lock_waits(self, observer: Callable[[float], None] | None) -> None:
        """Call ``observer`` with the seconds each write transaction waited for another member's write lock
        (0.0 when it got the lock at once; None: stop); for benchmarks and metrics of several members."""
        self._intake.store.lock_wait_observer = observer

    def close_reason(self) -> CloseReason | None:
        """Why the current round should close now: quorum, or deadline with ``min_updates``; None: keep collecting."""
        return self._intake.close_reason()

    def should_close(self) -> bool:
        """True when :meth:`close_reason` is not None."""
        return self.close_reason() is not None

    def status(self) -> AggregatorStatus:
        """A snapshot: round, status, totals over all members, close reason, counters."""
        reason = self._intake.close_reason()
        state = self._intake.state
        return AggregatorStatus(
            round=None if state is None else state.round,
            status=None if state is None else state.status,
            accepted=0 if state is None else state.accepted,
            samples=0 if state is None else state.samples,
            close_reason=reason,
            counters=self._intake.counters(),
        )

    def update_bytes_bound(self) -> int:
        """An upper bound on one sealed update (or aggregate) of the shared parameters, raw float32, in bytes."""
        tensors = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in self._config.spec.values())
        return tensors + 16 * 1024

    def current_model(self) -> bytes | None:
        """The signed model published for the current round (to republish after a restart); None before the first round."""
        self._intake.refresh()
        record = self._intake.record
        return None if record is None else record.model_blob

    def flush_counters(self) -> None:
        """Write the counters of rejections seen since the last write (they ride along with every
        acceptance, close and round start; call this periodically when only rejections arrive)."""
        self._intake.flush_counters()

    def close(self) -> None:
        """Write pending counters and close the store (releasing this member); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._intake.flush_counters()
        finally:
            self._intake.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _reject_model(self, reason: str, detail: str) -> ModelRejectedError:
        self._intake.count(f"model_rejected:{reason}")
        logger.warning("refused a model: %s (%s)", reason, detail)
        return ModelRejectedError(reason, detail)

    def _start(self, round: int, global_params: Mapping[str, np.ndarray], serve: ServeModel) -> bytes:
        """Start ``round`` from ``global_params``: the signed model to publish (the stored one if already current).

        A round whose bundle version differs from the stored round's starts with fresh
        influence bounds (the previous version's norms say nothing about the new model)."""
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        params = conform_params(self._config.spec, global_params, what="global model")
        with self._intake.write_transaction():
            record = self._intake.store.load_round()
            if record is not None and round < record.round:
                raise self._reject_model("stale_round", f"model for round {round}, current round is {record.round}")
            if record is not None and round == record.round:
                return record.model_blob
            if record is not None and record.status is RoundStatus.COLLECTING:
                abandoned, _ = self._intake.store.round_totals(record.round)
                if abandoned:
                    self._intake.count("abandoned_updates", abandoned)
                    logger.warning("round %d abandoned with %d accepted updates: round %d started", record.round, abandoned, round)
            base, blob = serve(record, round, params)
            self._intake.write_round_start(previous=record, round=round, global_params=params, base_params=base, model_blob=blob,
                                           fresh_bounds=record is not None and self.model_version(record.model_blob) != self._config.bundle_version)
        self._intake.refresh()
        logger.debug("round %d started", round)
        return blob

    def _sign_model(self, *, round: int, params: Mapping[str, np.ndarray], region: str | None,
                    bundle_version: int | None = None) -> bytes:
        header = ModelHeader.create(
            fleet=self._config.fleet,
            sender=self._identity,
            round=round,
            bundle_version=self._config.bundle_version if bundle_version is None else bundle_version,
            region=region,
            frames=self._config.announced_frames,
            clock=self._config.wall_clock,
        )
        return sign_model(header, params, signer_key=self._config.signing_key)
