"""The intake both aggregator tiers share: one sealed message in, one :class:`HandledUpdate` out.

Pipeline, cheapest and least trusting first::

    open_update (authenticate, decrypt, decode)     -> auth / malformed, no receipt
    for the CURRENT round (collecting or closed), already accepted from this sender?
        same nonce, same content                    -> duplicate: "accepted" receipt again, not counted
        same nonce, other content                   -> replay
        another nonce                               -> already_counted
    bundle version (before the round checks)        -> wrong_bundle_version
    round state (collecting, same round)            -> no_round / stale_round / future_round
                                                       (anything for an earlier round is stale, exact resends too)
    UpdateValidator (header, shapes, finite, norm)  -> its reason
    root: the aggregate's contributor list          -> missing_tensor / malformed
    admission: norm, bounded weight, float32 range  -> non_finite
    in ONE transaction: replay window check, round sample total, (root) device counted by
    another region, INSERT the accepted row, fold into this member's running sum (clipped to
    the round's bound), write it                    -> accepted (or sample_count / device_overlap)
    receipt signed only after the commit

The rule for repeats is docs/protocol.md, "Rounds, resends and replays".

The store is the authority; this object caches the current round, this
member's running sum and the replay window, and reloads them when the
store's round marker changes or a write failed. Every write re-checks the
marker inside its transaction, so several members sharing one store never
fold into a round another member has closed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from device_agent.errors import AuthenticationError, MalformedMessageError, RejectedUpdateError
from device_agent.protocol.envelope import OpenedUpdate, SenderKeys, open_update
from device_agent.protocol.headers import MessageKind, UpdateHeader
from device_agent.protocol.receipts import Receipt, sign_receipt
from device_agent.protocol.tensor_codec import encode_tensors
from device_agent.protocol.validation import RejectReason, ReplayWindow, UpdateValidator
from sdk.aggregation import AggregationConfig, MeanRule, WeightedMeanState
from sdk.aggregation.influence import InfluencePolicy, RoundBounds, first_bounds, next_bounds
from sdk.aggregator.admission import Admission, admit, check_round_total
from sdk.aggregator.auth_log import AuthFailureLog
from sdk.aggregator.config import AggregatorConfig
from sdk.aggregator.contributors import MAX_CONTRIBUTOR_BYTES, split_contributors
from sdk.aggregator.errors import StoreError
from sdk.aggregator.ledger import CounterLedger
from sdk.aggregator.merge import MergedRound, merge_round
from sdk.aggregator.outcomes import HandledUpdate, IntakeReason, Verdict
from sdk.aggregator.records import Acceptance, PartialSum, ReplaySnapshot, RoundMarker, RoundRecord
from sdk.aggregator.round_state import CloseReason, RoundState, RoundStatus
from sdk.aggregator.store import AcceptanceConflict, AggregatorStore

logger = logging.getLogger(__name__)

_MAX_ATTEMPTS = 8
WeightOf = Callable[[UpdateHeader], float]


class _Retry(Exception):
    """The store changed under a write (round moved, or another member took the update): decide again."""


def content_digest(opened: OpenedUpdate) -> bytes:
    """SHA-256 of the header and the decoded tensors: equal for a resend of the same update,
    even though each sealing uses a fresh ephemeral key and so different ciphertext."""
    return hashlib.sha256(opened.header.to_bytes() + encode_tensors(opened.tensors)).digest()


class UpdateIntake(CounterLedger):
    """Authenticates, deduplicates, validates and durably folds in the updates of one aggregator.

    ``identity``: issuer of receipts. ``kind``/``region``: what the validator
    requires (``region`` None: any). ``sender_is_region``: the sender id must
    equal the header's region (the root's rule for aggregates; such an intake
    also requires and checks each aggregate's contributor list). ``weight_of``:
    an accepted update's weight in the mean before bounds. ``influence``: how
    each round's bounds are set (None: no bounds, as at the root).
    """

    def __init__(
        self,
        *,
        config: AggregatorConfig,
        store: AggregatorStore,
        identity: str,
        kind: MessageKind,
        region: str | None,
        sender_keys: SenderKeys,
        aggregation: AggregationConfig,
        weight_of: WeightOf,
        sender_is_region: bool = False,
        influence: InfluencePolicy | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._identity = identity
        self._sender_keys = sender_keys
        self._aggregation = aggregation
        self._weight_of = weight_of
        self._sender_is_region = sender_is_region
        self._influence = influence
        limits = config.decode_limits()
        if sender_is_region:  # room for the aggregate's contributor list
            limits = replace(limits, max_tensors=limits.max_tensors + 1, max_total_bytes=limits.max_total_bytes + MAX_CONTRIBUTOR_BYTES)
        self._limits = limits
        self._validator = UpdateValidator(
            params=config.spec,
            max_norm=config.norm_bound,
            fleet=config.fleet,
            region=region,
            bundle_version=config.bundle_version,
            kind=kind,
        )
        super().__init__(store)
        self._what = kind.value
        #: One WARNING per claimed sender and minute for messages that fail authentication.
        self._auth_log = AuthFailureLog(clock=config.clock)
        self._loaded = False
        self._marker: RoundMarker | None = None
        self._record: RoundRecord | None = None
        self._state: RoundState | None = None
        self._partial = PartialSum()
        self._rule: MeanRule | None = None
        self._window = ReplayWindow(rounds=config.replay_rounds)
        self._window_seq = 0
        self.refresh()

    @property
    def record(self) -> RoundRecord | None:
        """The cached current round (None before the first); call :meth:`refresh` first for the latest."""
        return self._record

    # -- cache ---------------------------------------------------------------

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

    def _mean_rule(self) -> MeanRule | None:
        if self._aggregation.rule != "mean":
            return None  # buffered rules keep each delta in the store and replay them at close
        if self._partial.state.count == 0:
            return MeanRule(clip_norm=self._clip_norm(), expected_shapes=self._config.shapes)
        return MeanRule.from_state(self._partial.state, clip_norm=self._clip_norm())

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

    # -- the pipeline ----------------------------------------------------------

    def handle(self, blob: bytes | bytearray | memoryview, *, topic_sender: str | None = None) -> HandledUpdate:
        """Run one sealed message through the pipeline; ``topic_sender`` (None: unchecked) must equal its sender."""
        try:
            opened = open_update(blob, recipient_key=self._config.encryption_key, sender_public_key=self._sender_keys, limits=self._limits)
        except AuthenticationError:
            self._auth_log.report_update(blob, keys=self._sender_keys, topic_sender=topic_sender, what=self._what)
            return self._refuse(IntakeReason.AUTH, "", len(blob))
        except MalformedMessageError as exc:
            return self._refuse(IntakeReason.MALFORMED, str(exc), len(blob))
        header = opened.header
        if topic_sender is not None and topic_sender != header.sender:
            logger.warning("update signed by %s arrived on the topic of %s", header.sender, topic_sender)
            return self._refuse(IntakeReason.AUTH, "", len(blob))
        digest = content_digest(opened)
        for _ in range(_MAX_ATTEMPTS):
            self.refresh()
            try:
                # An exact resend of an update accepted in the CURRENT round (collecting, or closed and not
                # yet replaced) is acknowledged again: its receipt may have died with a crashed aggregator after
                # the commit. Once a later round has started, anything for an earlier round is stale_round,
                # exact resends included (docs/protocol.md, "Rounds, resends and replays").
                prior = None
                if self._state is not None and header.round == self._state.round:
                    prior = self._store.find_acceptance(header.sender, header.round)
                if prior is not None:
                    if prior.nonce == header.nonce and prior.digest == digest:
                        return self._answer(header, Verdict.DUPLICATE)
                    raise _prior_rejection(prior.nonce, header)
                admission = self._admit(opened)
                if self._commit(admission, digest):
                    return self._answer(header, Verdict.ACCEPTED, delta=admission.opened.tensors)
            except RejectedUpdateError as rejection:
                return self._answer(header, Verdict.REJECTED, rejection)
        raise StoreError(f"the store kept changing for {_MAX_ATTEMPTS} attempts at {header.sender} round {header.round}")

    def _admit(self, opened: OpenedUpdate) -> Admission:
        header = opened.header
        if self._state is None or self._record is None:
            raise RejectedUpdateError(IntakeReason.NO_ROUND.value, "no round has started")
        if self._sender_is_region and header.sender != header.region:
            raise RejectedUpdateError(RejectReason.REGION.value, f"sender {header.sender!r} reports for region {header.region!r}")
        if header.bundle_version != self._config.bundle_version:
            # Before the round checks: after a version switch the round numbers go on, and the sender
            # must hear the real cause (docs/rollout.md, "Version switch at a round boundary").
            raise RejectedUpdateError(RejectReason.WRONG_BUNDLE_VERSION.value,
                                      f"this aggregator runs bundle v{self._config.bundle_version}, the "
                                      f"{header.kind.value} is for v{header.bundle_version}")
        self._state.check_admission(header.round)
        self._validator.check_header(header, self._state.round)
        contributors = None
        if self._sender_is_region:
            opened, contributors = split_contributors(opened)
        self._validator.check_tensors(opened.tensors)
        return admit(opened, base=self._record.base_params, bounds=self.bounds, weight=self._weight_of(header),
                     contributors=contributors)

    def _commit(self, admission: Admission, digest: bytes) -> bool:
        """Accept in one transaction; False when the store moved under us (retry), True once committed."""
        opened = admission.opened
        header = opened.header
        acceptance = Acceptance(sender=header.sender, round=header.round, nonce=header.nonce, digest=digest,
                                sample_count=header.sample_count, weight=admission.weight, norm=admission.norm)
        try:
            with self.write_transaction():
                if self._store.round_marker() != self._marker:
                    raise _Retry()
                if self._store.find_acceptance(header.sender, header.round) is not None:
                    raise _Retry()  # another member accepted it meanwhile: answer it as a duplicate
                self._catch_up()
                self._window.check(header.sender, header.round, header.nonce)
                check_round_total(self._store.round_totals(header.round)[1], admission)
                if admission.contributors is not None:
                    self._claim_contributors(header.round, header.sender, [d for d, _ in admission.contributors])
                seq = self._store.insert_acceptance(acceptance, delta=None if self._rule is not None else opened.tensors)
                partial = self._fold(admission)  # mutates the cached rule: reload if anything below fails
                self._store.write_partial(header.round, partial)
                accepted, samples = self._store.round_totals(header.round)
        except (_Retry, AcceptanceConflict):
            self._loaded = False
            return False
        except RejectedUpdateError:
            raise
        except BaseException:
            self._loaded = False
            raise
        self._partial = partial
        self._window.record(header.sender, header.round, header.nonce)
        self._window_seq = seq
        if self._state is not None:
            self._state = self._state.with_totals(accepted=accepted, samples=samples)
        if admission.clipped:
            self._pending["clipped:norm"] += 1
            logger.debug("%s round %d: update of norm %.4g clipped to %.4g", header.sender, header.round, admission.norm,
                        self.bounds.clip_norm if self.bounds is not None else float("nan"))
        if admission.capped:
            self._pending["clipped:sample_count"] += 1
            logger.debug("%s round %d: sample count %d weighs %d (the round's cap)", header.sender, header.round,
                        header.sample_count, admission.samples)
        return True

    def _claim_contributors(self, round: int, region: str, devices: list[str]) -> None:
        """Root: record ``region``'s devices for ``round``; device_overlap when another region counted one already."""
        elsewhere = self._store.counted_elsewhere(round, devices, region)
        if elsewhere:
            pairs = ", ".join(f"{device} (counted by {other})" for device, other in sorted(elsewhere.items())[:10])
            logger.error("round %d: %s's aggregate counts %d device(s) another region already counted: %s; refused",
                         round, region, len(elsewhere), pairs)
            raise RejectedUpdateError(IntakeReason.DEVICE_OVERLAP.value, f"already counted by another region: {pairs}")
        self._store.insert_contributors(round, region, devices)

    def _fold(self, admission: Admission) -> PartialSum:
        old = self._partial
        weight = admission.weight
        if self._rule is not None:
            self._rule.accumulate(admission.opened.tensors, weight)
            state = self._rule.to_state()
        else:
            state = WeightedMeanState(sums={}, total_weight=old.state.total_weight + weight, count=old.state.count + 1)
        return PartialSum(state=state, samples=old.samples + admission.samples)

    # -- answers ---------------------------------------------------------------

    def _refuse(self, reason: IntakeReason, detail: str, size: int) -> HandledUpdate:
        """Count and answer a message refused before it authenticated (auth failures are logged by the caller)."""
        self._pending[f"rejected:{reason.value}"] += 1
        if reason is not IntakeReason.AUTH:
            logger.warning("refused a message of %d bytes: %s (%s)", size, reason.value, detail)
        return HandledUpdate(verdict=Verdict.REJECTED, reason=reason.value, detail=detail)

    def _answer(self, header: UpdateHeader, verdict: Verdict, rejection: RejectedUpdateError | None = None, *,
                delta: dict[str, np.ndarray] | None = None) -> HandledUpdate:
        if rejection is not None:
            self._pending[f"rejected:{rejection.reason}"] += 1
            logger.info("rejected %s from %s for round %d: %s", header.kind.value, header.sender, header.round, rejection)
        elif verdict is Verdict.DUPLICATE:
            self._pending["duplicate"] += 1
            logger.info("duplicate %s from %s for round %d: acknowledged again", header.kind.value, header.sender, header.round)
        else:
            logger.debug("accepted %s from %s for round %d", header.kind.value, header.sender, header.round)
        receipt = Receipt.answering(header, issuer=self._identity, rejection=rejection, clock=self._config.wall_clock)
        return HandledUpdate(
            verdict=verdict,
            reason="" if rejection is None else rejection.reason,
            detail="" if rejection is None else rejection.detail,
            receipt=sign_receipt(receipt, signer_key=self._config.signing_key),
            header=header,
            delta=delta,
        )

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


def _prior_rejection(prior_nonce: bytes, header: UpdateHeader) -> RejectedUpdateError:
    if prior_nonce == header.nonce:
        return RejectedUpdateError(RejectReason.REPLAY.value, f"nonce {header.nonce.hex()} reused with different content")
    return RejectedUpdateError(IntakeReason.ALREADY_COUNTED.value, f"{header.sender} already has an update counted in round {header.round}")
