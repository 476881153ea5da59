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
    UpdateValidator (header, shapes; finite + norm  -> its reason
      in one pass, the norm kept for admission)
    root: the aggregate's contributor list          -> missing_tensor / malformed
    admission: bounded weight, float32 range        -> non_finite
    fold into a copy of this member's running sum (clipped to the round's bound)
    in ONE transaction per batch: per update the replay window, the round's sample total, (root)
    no device counted by another region, INSERT the accepted row  -> accepted (or replay /
    sample_count / device_overlap, that update alone); then write the sum, COMMIT
    receipts signed only after the commit

The rule for repeats is docs/protocol.md, "Rounds, resends and replays".

Group commit: :meth:`UpdateIntake.handle_batch` runs a batch through the
checks above, folds the admitted updates into a copy of the running sum
(outside the transaction), then takes the write lock once for the batch:
per update the in-transaction checks and its ``accepted`` row (a bad one is
answered alone), then the new sum, then ONE commit; every receipt of the
batch is signed after it. :meth:`UpdateIntake.handle` is a batch of one.
The cached round, running sum and replay window live in
:class:`~sdk.aggregator.round_cache.RoundCache`, the base class.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace

import numpy as np
from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]

from device_agent.errors import AuthenticationError, MalformedMessageError, RejectedUpdateError
from device_agent.protocol.envelope import OpenedUpdate, SenderKeys, open_update
from device_agent.protocol.headers import MessageKind, UpdateHeader
from device_agent.protocol.receipts import Receipt, sign_receipt
from device_agent.protocol.validation import RejectReason, UpdateValidator
from sdk.aggregation import AggregationConfig, StreamingWeightedMean, WeightedMeanState
from sdk.aggregation.influence import InfluencePolicy
from sdk.aggregation.robust import scale_delta
from sdk.aggregator.admission import FLOAT32_SAFE, Admission, admit, check_round_total
from sdk.aggregator.auth_log import AuthFailureLog
from sdk.aggregator.batching import IncomingUpdate
from sdk.aggregator.config import AggregatorConfig
from sdk.aggregator.contributors import MAX_CONTRIBUTOR_BYTES, split_contributors
from sdk.aggregator.errors import StoreError
from sdk.aggregator.outcomes import HandledUpdate, IntakeReason, Verdict
from sdk.aggregator.records import Acceptance, PartialSum
from sdk.aggregator.round_cache import RoundCache
from sdk.aggregator.store import AcceptanceConflict, AggregatorStore

logger = logging.getLogger(__name__)

_MAX_ATTEMPTS = 8
WeightOf = Callable[[UpdateHeader], float]


class _Retry(Exception):
    """The store changed under a write (round moved, or another member took the update): decide again."""


class UpdateIntake(RoundCache):
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
        self._identity = identity
        self._sender_keys = sender_keys
        self._weight_of = weight_of
        self._sender_is_region = sender_is_region
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
        self._what = kind.value
        #: One WARNING per claimed sender and minute for messages that fail authentication.
        self._auth_log = AuthFailureLog(clock=config.clock)
        super().__init__(config=config, store=store, aggregation=aggregation, influence=influence)

    # -- the pipeline ----------------------------------------------------------

    def handle(self, blob: bytes | bytearray | memoryview, *, topic_sender: str | None = None) -> HandledUpdate:
        """Run one sealed message through the pipeline; ``topic_sender`` (None: unchecked) must equal its sender."""
        return self.handle_batch([IncomingUpdate(blob=blob, topic_sender=topic_sender)])[0]

    def handle_batch(self, items: Sequence[IncomingUpdate]) -> list[HandledUpdate]:
        """Run several sealed messages through the pipeline with ONE commit (group commit): one answer per
        item, in order. Every accepted update is durable before any receipt of the batch is signed; a bad
        update is answered alone and the others still commit. StoreError when the store keeps changing."""
        # The norms are float64 dot products over ~1e5 values: a multi-threaded BLAS wakes its threads for each
        # and, on a busy 2-core host, made an update cost 10x its single-threaded time (docs/aggregation.md).
        with _single_threaded_blas():
            return self._handle_batch(items)

    def _handle_batch(self, items: Sequence[IncomingUpdate]) -> list[HandledUpdate]:
        answers: list[HandledUpdate | None] = [None] * len(items)
        opened: dict[int, OpenedUpdate] = {}
        for i, item in enumerate(items):
            result = self._open(item)
            if isinstance(result, HandledUpdate):
                answers[i] = result
            else:
                opened[i] = result
        todo, conflicts = sorted(opened), 0
        while todo:
            todo, conflicted = self._decide(todo, opened, answers)
            conflicts += conflicted
            if conflicts > _MAX_ATTEMPTS:
                header = opened[todo[0]].header
                raise StoreError(f"the store kept changing for {_MAX_ATTEMPTS} attempts at {header.sender} round {header.round}")
        done = [answer for answer in answers if answer is not None]
        if len(done) != len(items):  # every path above answers its item; checked, not assumed
            raise RuntimeError(f"the intake left {len(items) - len(done)} of {len(items)} updates unanswered")
        return done

    def _open(self, item: IncomingUpdate) -> OpenedUpdate | HandledUpdate:
        """The authenticated update with its digest, or the refusal to answer it with."""
        blob = item.blob
        try:
            opened = open_update(blob, recipient_key=self._config.encryption_key, sender_public_key=self._sender_keys,
                                 limits=self._limits, with_digest=True, frame_versions=self._config.update_frames)
        except AuthenticationError:
            self._auth_log.report_update(blob, keys=self._sender_keys, topic_sender=item.topic_sender, what=self._what)
            return self._refuse(IntakeReason.AUTH, "", len(blob))
        except MalformedMessageError as exc:
            return self._refuse(IntakeReason.MALFORMED, str(exc), len(blob))
        if item.topic_sender is not None and item.topic_sender != opened.header.sender:
            logger.warning("update signed by %s arrived on the topic of %s", opened.header.sender, item.topic_sender)
            return self._refuse(IntakeReason.AUTH, "", len(blob))
        return opened

    def _decide(self, todo: list[int], opened: dict[int, OpenedUpdate],
                answers: list[HandledUpdate | None]) -> tuple[list[int], int]:
        """One pass over the undecided items: answer what can be answered, commit the admitted ones together.

        Returns the items to decide again (a second update of a sender already in this pass, or an item
        another member took meanwhile) and 1 if the store changed under the commit, else 0.
        """
        self.refresh()
        admitted: list[tuple[int, Admission]] = []
        later: list[int] = []
        taken: set[tuple[str, int]] = set()
        current = None if self._state is None else self._state.round
        priors = {} if current is None else \
            self._store.find_acceptances(current, [opened[i].header.sender for i in todo if opened[i].header.round == current])
        for i in todo:
            header = opened[i].header
            if (header.sender, header.round) in taken:
                later.append(i)  # decided once its batch-mate is committed: a duplicate, a replay, or already_counted
                continue
            try:
                if header.round == current and self._answer_repeat(i, opened[i], priors.get(header.sender), answers):
                    continue
                admitted.append((i, self._admit(opened[i])))
                taken.add((header.sender, header.round))
            except RejectedUpdateError as rejection:
                answers[i] = self._answer(header, Verdict.REJECTED, rejection)
        if not admitted:
            return later, 0
        retry = self._commit(admitted, answers)
        if retry is None:
            return sorted(later + [i for i, _ in admitted]), 1
        return sorted(later + retry), 1 if retry else 0

    def _answer_repeat(self, i: int, opened: OpenedUpdate, prior: Acceptance | None, answers: list[HandledUpdate | None]) -> bool:
        """Answer an update of a sender already accepted (``prior``) in the CURRENT round (collecting, or closed and
        not yet replaced): an exact resend is acknowledged again (its receipt may have died with a crashed aggregator
        after the commit), anything else is a replay or already_counted. Once a later round has started, anything for
        an earlier round is stale_round, exact resends included (docs/protocol.md, "Rounds, resends and replays")."""
        if prior is None:
            return False
        header = opened.header
        if prior.nonce == header.nonce and prior.digest == opened.digest:
            answers[i] = self._answer(header, Verdict.DUPLICATE)
            return True
        raise _prior_rejection(prior.nonce, header)

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
        bounds = self.bounds  # admission's thresholds: exact decisions near them (clip or not, the float32 range)
        near = (FLOAT32_SAFE - self._base_largest,) + (() if bounds is None or bounds.clip_norm is None else (bounds.clip_norm,))
        norm = self._validator.check_tensors(opened.tensors, exact_near=near)  # measured once: admission and clipping reuse it
        return admit(opened, base=self._record.base_params, bounds=bounds, weight=self._weight_of(header),
                     contributors=contributors, base_largest=self._base_largest, norm=norm)

    def _commit(self, admitted: list[tuple[int, Admission]], answers: list[HandledUpdate | None]) -> list[int] | None:
        """Fold the admitted updates, then accept them in ONE transaction, then answer them.

        The fold runs before the transaction (into a copy of the running sum), so the write lock is held only
        for the SQL. Returns the items to decide again (another member accepted them meanwhile), or None when
        the round moved under the batch (decide every item again). Nothing is answered before the commit.
        """
        batch_digests = {i: adm.opened.digest for i, adm in admitted}
        rule, partial = self._folded(admitted)
        logger.debug("%d update(s) folded, committing", len(admitted))
        kept: list[tuple[int, Admission, int]] = []
        rejected: list[tuple[int, RejectedUpdateError]] = []
        retry: list[int] = []
        try:
            with self.write_transaction():
                if self._store.round_marker() != self._marker:
                    raise _Retry()
                self._catch_up()
                round = admitted[0][1].opened.header.round
                total = self._store.round_totals(round)[1]
                for i, admission in admitted:
                    try:
                        if admission.contributors is None:
                            seq = self._insert(admission, batch_digests[i], total)  # one INSERT: atomic alone
                        else:
                            with self._store.savepoint():  # several writes: undone together if one fails
                                seq = self._insert(admission, batch_digests[i], total)
                    except AcceptanceConflict:
                        retry.append(i)  # another member accepted it meanwhile: answered as a duplicate next pass
                        continue
                    except RejectedUpdateError as rejection:
                        rejected.append((i, rejection))
                        continue
                    total += admission.samples
                    kept.append((i, admission, seq))
                if len(kept) != len(admitted):  # rare: refold what the transaction kept
                    rule, partial = self._folded([(i, a) for i, a, _ in kept])
                if kept:
                    self._store.write_partial(round, partial)
                accepted, samples = self._store.round_totals(round)
        except _Retry:
            self._loaded = False
            return None
        except BaseException:
            self._loaded = False
            raise
        self._rule, self._partial = rule, partial
        if self._state is not None:
            self._state = self._state.with_totals(accepted=accepted, samples=samples)
        for i, admission, seq in kept:
            header = admission.opened.header
            self._window.record(header.sender, header.round, header.nonce)
            self._window_seq = max(self._window_seq, seq)
            self._count_bounds(admission)
            answers[i] = self._answer(header, Verdict.ACCEPTED, delta=admission.opened.tensors)
        for i, refusal in rejected:
            answers[i] = self._answer(dict(admitted)[i].opened.header, Verdict.REJECTED, refusal)
        return retry

    def _insert(self, admission: Admission, digest: bytes | None, round_samples: int) -> int:
        """One update's checks and row inside the batch's transaction (and savepoint); its ``seq``."""
        opened = admission.opened
        header = opened.header
        if digest is None:
            raise StoreError("an update reached the commit without its digest")
        try:
            self._window.check(header.sender, header.round, header.nonce)
        except RejectedUpdateError:
            if self._store.find_acceptance(header.sender, header.round) is not None:
                raise AcceptanceConflict(f"{header.sender} round {header.round} was accepted meanwhile") from None
            raise
        check_round_total(round_samples, admission)
        if admission.contributors is not None:
            self._claim_contributors(header.round, header.sender, admission.contributors)
        acceptance = Acceptance(sender=header.sender, round=header.round, nonce=header.nonce, digest=digest,
                                sample_count=header.sample_count, weight=admission.weight, norm=admission.norm)
        return self._store.insert_acceptance(acceptance, delta=None if self._rule is not None else opened.tensors)

    def _count_bounds(self, admission: Admission) -> None:
        header = admission.opened.header
        if admission.clipped:
            self._pending["clipped:norm"] += 1
            logger.debug("%s round %d: update of norm %.4g clipped to %.4g", header.sender, header.round, admission.norm,
                         self.bounds.clip_norm if self.bounds is not None and self.bounds.clip_norm is not None else float("nan"))
        if admission.capped:
            self._pending["clipped:sample_count"] += 1
            logger.debug("%s round %d: sample count %d weighs %d (the round's cap)", header.sender, header.round,
                         header.sample_count, admission.samples)

    def _claim_contributors(self, round: int, region: str, devices: Sequence[tuple[str, int]]) -> None:
        """Root or middle tier: record ``region``'s (device, weight) pairs for ``round``; device_overlap when another
        region counted one of those devices already."""
        elsewhere = self._store.counted_elsewhere(round, [d for d, _ in devices], region)
        if elsewhere:
            pairs = ", ".join(f"{device} (counted by {other})" for device, other in sorted(elsewhere.items())[:10])
            logger.error("round %d: %s's aggregate counts %d device(s) another region already counted: %s; refused",
                         round, region, len(elsewhere), pairs)
            raise RejectedUpdateError(IntakeReason.DEVICE_OVERLAP.value, f"already counted by another region: {pairs}")
        self._store.insert_contributors(round, region, devices)

    def _folded(self, admitted: Sequence[tuple[int, Admission]]) -> tuple[StreamingWeightedMean | None, PartialSum]:
        """The running sum with ``admitted`` folded in, in order, computed on a copy (the cache stays as committed)."""
        old = self._partial
        weight = sum(admission.weight for _, admission in admitted)
        samples = old.samples + sum(admission.samples for _, admission in admitted)
        if self._rule is None:  # buffered rules keep each delta in its row; the sum only counts
            state = WeightedMeanState(sums={}, total_weight=old.state.total_weight + weight, count=old.state.count + len(admitted))
            return None, PartialSum(state=state, samples=samples)
        rule = StreamingWeightedMean.from_state(self._rule.to_state()) if self._rule.count else \
            StreamingWeightedMean(expected_shapes=self._config.shapes)
        for _, admission in admitted:
            delta = admission.opened.tensors
            if admission.clipped:
                # clip_by_norm's values (float64 product, rounded to float32 once) from the norm the validator
                # measured; an update within the bound folds as it is (clip_by_norm would return the same values).
                delta = scale_delta(delta, admission.scale)
            rule.accumulate(delta, admission.weight, checked=True)  # the validator checked names, shapes, finiteness
        return rule, PartialSum(state=rule.to_state(), samples=samples)

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

@functools.lru_cache(maxsize=1)
def _blas_controller(modules: int) -> ThreadpoolController:
    """The BLAS and OpenMP pools loaded in this process while ``modules`` modules were imported (creating a
    controller costs ~0.4 ms: it is made again only after an import, which may have loaded another BLAS)."""
    return ThreadpoolController()


def _single_threaded_blas() -> AbstractContextManager[object]:
    """BLAS limited to one thread while the block runs (process-wide: another thread's BLAS calls meanwhile too)."""
    return _blas_controller(len(sys.modules)).limit(limits=1, user_api="blas")


def _prior_rejection(prior_nonce: bytes, header: UpdateHeader) -> RejectedUpdateError:
    if prior_nonce == header.nonce:
        return RejectedUpdateError(RejectReason.REPLAY.value, f"nonce {header.nonce.hex()} reused with different content")
    return RejectedUpdateError(IntakeReason.ALREADY_COUNTED.value, f"{header.sender} already has an update counted in round {header.round}")
