"""The intake both aggregator tiers share: one sealed message in, one :class:`HandledUpdate` out.

Pipeline, cheapest and least trusting first::

    open_update (authenticate, decrypt, decode)     -> auth / malformed, no receipt
    for the CURRENT round (collecting or closed), already accepted from this sender?
      (first pass: asked of the store when the replay window knows the sender for the
      round; an acceptance by another member the window has not caught up with yet is
      found by the commit, and the next pass asks the store for every sender)
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
checks above one update at a time, folding each admitted update into a copy
of the running sum as soon as it is admitted and then letting go of its
tensors (:mod:`~sdk.aggregator.batch_fold`: the batch never holds all its
decoded deltas), then takes the write lock once for the batch:
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
from dataclasses import dataclass, field, replace

import numpy as np
from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]

from device_agent.errors import AuthenticationError, MalformedMessageError, RejectedUpdateError
from device_agent.protocol.envelope import OpenedUpdate, SenderKeys, open_update
from device_agent.protocol.headers import MessageKind, UpdateHeader
from device_agent.protocol.receipts import Receipt, sign_receipt
from device_agent.protocol.validation import RejectReason, UpdateValidator
from sdk.aggregation import AggregationConfig, StreamingWeightedMean
from sdk.aggregation.influence import InfluencePolicy
from sdk.aggregator.admission import FLOAT32_SAFE, Admission, admit, check_round_total
from sdk.aggregator.auth_log import AuthFailureLog
from sdk.aggregator.batch_fold import BatchFold
from sdk.aggregator.batching import IncomingUpdate
from sdk.aggregator.config import AggregatorConfig
from sdk.aggregator.contributors import MAX_CONTRIBUTOR_BYTES, split_contributors
from sdk.aggregator.errors import StoreError
from sdk.aggregator.outcomes import HandledUpdate, IntakeReason, Verdict
from sdk.aggregator.records import Acceptance, PartialSum, RoundMarker
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
    each round's bounds are set (None: no bounds, as at the root). ``keep_deltas``: an accepted update's
    :attr:`HandledUpdate.delta` holds its tensors (else None: the intake lets go of them once folded).
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
        keep_deltas: bool = False,
    ) -> None:
        self._identity = identity
        self._keep_deltas = keep_deltas
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
        batch = self.begin_batch()
        with self._store.snapshot():  # the lookups of updates handed over together read one state of the store
            for item in items:
                batch.add(item)
        return batch.commit()

    def begin_batch(self) -> PendingBatch:
        """A batch to fill as updates arrive (:meth:`PendingBatch.add`: each is opened, checked and folded at once,
        while its bytes are fresh) and then commit (:meth:`PendingBatch.commit`). One at a time per intake; nothing
        else may write through this intake between the first add and the commit."""
        self.refresh()
        return PendingBatch(self)

    def _new_pass(self) -> _Pass:
        self._catch_up()  # every acceptance committed so far, by any member: the pass's lookups start from it
        return _Pass(fold=self._batch_fold(), current=None if self._state is None else self._state.round, marker=self._marker)

    def _settle(self, items: Sequence[IncomingUpdate], answers: list[HandledUpdate | None], todo: list[int],
                conflicts: int) -> list[HandledUpdate]:
        """Decide ``todo`` again, pass after pass, until every item is answered; the answers in order."""
        while todo:
            if conflicts > _MAX_ATTEMPTS:
                raise StoreError(f"the store kept changing for {_MAX_ATTEMPTS} attempts at {len(todo)} update(s) of a batch")
            todo, conflicted = self._decide(items, todo, answers)
            conflicts += conflicted
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

    def _reopened_tensors(self, item: IncomingUpdate) -> dict[str, np.ndarray]:
        """The tensors of an item that opened before, opened again from its bytes (a root's or middle tier's
        aggregate without its contributor list). _Retry when it no longer opens (its sender's key was revoked
        meanwhile): the batch is decided again and the update refused then."""
        opened = self._open(item)
        if isinstance(opened, HandledUpdate):
            logger.warning("an update that opened before did not open again (%s): deciding its batch again", opened.reason)
            raise _Retry()
        if self._sender_is_region:
            opened, _ = split_contributors(opened)
        return opened.tensors

    def _decide(self, items: Sequence[IncomingUpdate], todo: list[int],
                answers: list[HandledUpdate | None]) -> tuple[list[int], int]:
        """A later pass over the undecided items: open each, answer what can be answered, fold the admitted ones
        at once (batch_fold), then commit them together. Returns what :meth:`_finish` returns."""
        self.refresh()
        state = self._new_pass()
        with self._store.snapshot():  # the pass's lookups read one state of the store (cheaper than one read each)
            for i in todo:
                self._look(items, answers, state, i)
        return self._finish(items, answers, state)

    def _finish(self, items: Sequence[IncomingUpdate], answers: list[HandledUpdate | None],
                state: _Pass) -> tuple[list[int], int]:
        """Commit a pass's admitted updates. Returns the items to decide again (a second update of a sender already
        in the pass, or an item another member took meanwhile) and 1 if the store changed under the commit, else 0."""
        if not state.admitted:
            return state.later, 0
        retry = self._commit(items, state.admitted, state.fold, answers, state.marker)
        if retry is None:
            return sorted(state.later + [i for i, _ in state.admitted]), 1
        return sorted(state.later + retry), 1 if retry else 0

    def _look(self, items: Sequence[IncomingUpdate], answers: list[HandledUpdate | None], state: _Pass, i: int) -> None:
        """Open item ``i``, answer it now if it can be answered, else admit and fold it into the pass (or defer it)."""
        opened = self._open(items[i])
        if isinstance(opened, HandledUpdate):
            answers[i] = opened
            return
        header = opened.header
        if (header.sender, header.round) in state.taken:
            state.later.append(i)  # decided once its batch-mate is committed: a duplicate, a replay, or already_counted
            return
        try:
            # A repeat is answered before validation, whoever counted the first: the store is asked about a sender
            # the pass's catch-up saw accepted. One accepted by another member since is found at the commit.
            known = header.round == state.current and (header.sender, header.round) in self._accepted_keys
            prior = self._store.find_acceptance(header.sender, header.round) if known else None
            if self._answer_repeat(i, opened, prior, answers):
                return
            state.admitted.append((i, state.fold.add(self._admit(opened))))
            state.taken.add((header.sender, header.round))
        except RejectedUpdateError as rejection:
            answers[i] = self._answer(header, Verdict.REJECTED, rejection)

    def _batch_fold(self) -> BatchFold:
        return BatchFold(self._rule, self._partial, shapes=self._config.shapes, keep_tensors=self._keep_deltas)

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

    def _commit(self, items: Sequence[IncomingUpdate], admitted: list[tuple[int, Admission]], fold: BatchFold,
                answers: list[HandledUpdate | None], marker: RoundMarker | None) -> list[int] | None:
        """Accept the admitted updates, already in ``fold``, in ONE transaction, then answer them.

        The fold ran before the transaction (into a copy of the running sum), so the write lock is held only
        for the SQL. Returns the items to decide again (another member accepted them meanwhile), or None when
        the round moved under the batch (decide every item again). Nothing is answered before the commit.
        """
        batch_digests = {i: adm.opened.digest for i, adm in admitted}
        rule, partial = fold.result()
        logger.debug("%d update(s) folded, committing", len(admitted))
        kept: list[tuple[int, Admission, int]] = []
        rejected: list[tuple[int, RejectedUpdateError]] = []
        retry: list[int] = []
        try:
            with self.write_transaction():
                # The round as it stood when the pass began (a batch filled on arrival may see this member close
                # the round between two adds, which refreshes the cache): anything else, decide the batch again.
                if self._store.round_marker() != marker or self._marker != marker:
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
                    rule, partial = self._refolded(items, [(i, a) for i, a, _ in kept])
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
            self._accepted_keys.add((header.sender, header.round))
            self._window.record(header.sender, header.round, header.nonce)
            self._window_seq = max(self._window_seq, seq)
            self._count_bounds(admission)
            answers[i] = self._answer(header, Verdict.ACCEPTED, delta=admission.opened.tensors if self._keep_deltas else None)
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

    def _refolded(self, items: Sequence[IncomingUpdate],
                  kept: Sequence[tuple[int, Admission]]) -> tuple[StreamingWeightedMean | None, PartialSum]:
        """The running sum with only ``kept`` folded in, in order (the batch's fold let go of their tensors: an
        update without them opens again from its item's bytes)."""
        fold = self._batch_fold()
        for i, admission in kept:
            if not admission.opened.tensors:
                admission = replace(admission, opened=replace(admission.opened, tensors=self._reopened_tensors(items[i])))
            fold.add(admission)
        return fold.result()

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

@dataclass(kw_only=True)
class _Pass:
    """One pass over a batch's items: the fold so far, what it admitted, what waits for the commit."""

    fold: BatchFold
    current: int | None
    marker: RoundMarker | None
    admitted: list[tuple[int, Admission]] = field(default_factory=list)
    later: list[int] = field(default_factory=list)
    taken: set[tuple[str, int]] = field(default_factory=set)


class PendingBatch:
    """A group-commit batch filled as updates arrive (:meth:`UpdateIntake.begin_batch`).

    :meth:`add` opens, authenticates, deduplicates, validates and folds an update at once, while its bytes are
    fresh in the CPU's caches, and answers nothing; :meth:`commit` accepts the admitted ones in ONE transaction
    and returns one answer per added item, in order (the same answers :meth:`UpdateIntake.handle_batch` gives).
    """

    def __init__(self, intake: UpdateIntake) -> None:
        self._intake = intake
        self._items: list[IncomingUpdate] = []
        self._answers: list[HandledUpdate | None] = []
        self._pass = intake._new_pass()
        self._done = False
        # numpy's BLAS single-threaded from the first add to the end of the commit (not per add: threadpoolctl's
        # limit costs tens of microseconds each time, a tenth of a small update's whole intake).
        self._blas = _single_threaded_blas()
        self._blas.__enter__()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: IncomingUpdate) -> None:
        """Take in one sealed update (its answer comes from :meth:`commit`)."""
        if self._done:
            raise RuntimeError("this batch was committed")
        self._items.append(item)
        self._answers.append(None)
        try:
            self._intake._look(self._items, self._answers, self._pass, len(self._items) - 1)
        except BaseException:  # a store failure before anything was folded: the batch stays as it was
            self._items.pop()
            self._answers.pop()
            raise

    def commit(self) -> list[HandledUpdate]:
        """Make the admitted updates durable together, then answer every item (StoreError when the store keeps
        changing). A batch commits once."""
        if self._done:
            raise RuntimeError("this batch was committed")
        self._done = True
        try:
            todo, conflicts = self._intake._finish(self._items, self._answers, self._pass)
            return self._intake._settle(self._items, self._answers, todo, conflicts)
        finally:
            self._blas.__exit__(None, None, None)


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
