"""The regional aggregator: devices' sealed updates in, one sealed aggregate per round out.

Round ``r`` at region ``j`` (notation of docs/aggregation.md)::

    G_r   the root's global model for round r (verified with the root's key)
    S_r   the model the region serves its devices for round r:
              S_r = mix_regional(R_{r-1}, G_r, regional_weight)
                  = a * R_{r-1} + (1 - a) * G_r        (S_r = G_r when there is no R_{r-1} yet)
    d_k   device k's delta, trained from S_r, with n_k samples
    D_r   the region's mean delta: sum_k n_k d_k / sum_k n_k   (or median / trimmed mean)
    R_r   the regional model after the round: S_r + D_r  (S_r if nothing was accepted)

FedFomo (``fomo_candidates`` > 0): each accepted device's model ``S_r + d_k``
goes into an in-memory :class:`~sdk.aggregator.candidates.CandidatePool`;
:meth:`RegionalAggregator.handle_candidate_request` answers a device's signed
request with peers' models sealed to it. The mean of deltas still runs:
``R_r = S_r + D_r`` is then the (weighted) average of the device models.

``D_r`` and ``sum_k n_k`` go to the root, sealed to the root's X25519 key
and signed by the region. ``regional_weight`` 0 is plain hierarchical
FedAvg (devices train from the global model); 1 keeps the region on its
own model, the global one only seeding the first round. The interpolation
is the cluster-level form of Mansour et al., "Three Approaches for
Personalization with Applications to Federated Learning" (2020); the two
tiers follow HierFAVG (Liu et al., ICC 2020).

In a deeper tree (docs/aggregation.md, "Any depth") "the root" above reads
"the tier above" (``RegionalConfig.parent``): a cell under a middle tier
(:mod:`sdk.aggregator.middle`) starts rounds from that tier's model and
forwards to it; nothing else changes.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from device_agent.errors import AuthenticationError, MalformedMessageError
from device_agent.protocol.candidate_request import open_candidate_request
from device_agent.protocol.envelope import SenderKeys, open_model, seal_candidates, seal_update
from device_agent.protocol.frame_versions import choose_frame_version
from device_agent.protocol.headers import MAX_CANDIDATES, CandidatesHeader, MessageKind, UpdateHeader, check_id
from sdk.aggregation import AggregationConfig, mix_regional
from sdk.aggregation.influence import InfluencePolicy
from sdk.aggregator.batching import IncomingUpdate
from sdk.aggregator.candidates import CandidatePool
from device_agent.release.carry import carry_parameters
from sdk.aggregator.config import AggregatorConfig, apply_delta, conform_params
from sdk.aggregator.contributors import CONTRIBUTORS_TENSOR, encode_contributors
from sdk.aggregator.errors import RoundStateError
from sdk.aggregator.forwarding import ForwardAnswer, settle_forward
from sdk.aggregator.intake import UpdateIntake
from sdk.aggregator.merge import MergedRound
from sdk.aggregator.outcomes import HandledUpdate
from sdk.aggregator.records import ClosedRound, RoundRecord
from sdk.aggregator.store import AggregatorStore
from sdk.aggregator.tier import AggregatorTier, open_with_store

logger = logging.getLogger(__name__)
MAX_ANSWER_KEYS = 100_000
"""Past this many (device, round) answer counts, counts of earlier rounds are forgotten."""


@dataclass(frozen=True, kw_only=True)
class RegionalConfig(AggregatorConfig):
    """A regional aggregator: :class:`AggregatorConfig` plus the region's own settings.

    ``region``: the region id (also the id it signs receipts, models and
    aggregates as). ``device_keys``: device id -> Ed25519 public key, or a
    lookup returning None for an unknown device. ``root_verify_key``: the
    root's Ed25519 key (global models). ``root_encryption_key``: the root's
    X25519 key (aggregates are sealed to it). In a deeper tree these two are
    the keys of the tier above, whatever it is, and ``parent`` names it: the
    id that signs the models this region starts rounds from (None: the root,
    whose global models name no region; docs/aggregation.md, "Any depth").
    ``aggregation``: how updates are combined (mean, median, trimmed mean);
    its ``clip_norm`` must stay None: the aggregator bounds norms and weights through ``influence``
    (:class:`~sdk.aggregation.influence.InfluencePolicy`, on by default; see docs/security.md).
    ``regional_weight``: ``a`` in ``S_r = a R_{r-1} + (1 - a) G_r``, in [0, 1].
    ``fomo_candidates``: the most FedFomo candidates served per request (0: FedFomo off; at most 32).
    ``fomo_requests_per_round``: answers one device may get per round (bounds the work a device can cause).
    """

    region: str
    device_keys: SenderKeys
    root_verify_key: Ed25519PublicKey
    root_encryption_key: X25519PublicKey
    aggregation: AggregationConfig = AggregationConfig()
    influence: InfluencePolicy = InfluencePolicy()
    regional_weight: float = 0.0
    fomo_candidates: int = 0
    fomo_requests_per_round: int = 3
    parent: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_id("region", self.region)
        if self.parent is not None:
            check_id("parent", self.parent)
            if self.parent == self.region:
                raise ValueError(f"region {self.region!r} cannot be its own parent")
        for name, low, high in (("fomo_candidates", 0, MAX_CANDIDATES), ("fomo_requests_per_round", 1, 1000)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
        if not isinstance(self.root_verify_key, Ed25519PublicKey):
            raise TypeError("root_verify_key must be an Ed25519PublicKey")
        if not isinstance(self.root_encryption_key, X25519PublicKey):
            raise TypeError("root_encryption_key must be an X25519PublicKey")
        if not isinstance(self.aggregation, AggregationConfig):
            raise TypeError("aggregation must be an AggregationConfig")
        if self.aggregation.clip_norm is not None:
            raise ValueError("aggregation.clip_norm is not used by the aggregators: bound norms with "
                             "influence=InfluencePolicy(norm='fixed', norm_bound=...) (or the adaptive default)")
        if not isinstance(self.influence, InfluencePolicy):
            raise TypeError("influence must be an InfluencePolicy")
        a = self.regional_weight
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (math.isfinite(a) and 0.0 <= a <= 1.0):
            raise ValueError(f"regional_weight must be a number in [0, 1], got {a!r}")


@dataclass(frozen=True, kw_only=True)
class CandidateAnswer:
    """The fate of one candidate request: ``blob`` (sealed to the requester) to publish on its
    ``down/candidates`` topic, or None with ``reason`` (``auth``, ``malformed``, ``wrong_round``,
    ``too_many``, ``fomo_off``) when refused. ``device`` is None when the request did not authenticate."""

    device: str | None
    blob: bytes | None
    peers: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class RegionalAggregate:
    """The result of closing a regional round.

    ``mean_delta`` (D_r) is None and ``blob`` None when nothing was accepted:
    there is nothing to forward. ``blob`` is the sealed aggregate for the root
    (kind ``aggregate``, ``sample_count`` = ``sample_count``).
    ``regional_params`` is R_r = S_r + D_r, the model mixed into the next round.
    """

    round: int
    mean_delta: dict[str, np.ndarray] | None
    update_count: int
    sample_count: int
    regional_params: dict[str, np.ndarray]
    blob: bytes | None


class RegionalAggregator(AggregatorTier):
    """One region's aggregator over a durable store; see the module docstring for the round's math.

    Phases: :meth:`handle_root_model` (or :meth:`start_round`) starts a round
    and gives the signed model to publish to the region's devices;
    :meth:`handle_update` takes each sealed device update; when
    :meth:`should_close` says so, :meth:`close_round` gives the sealed aggregate
    to forward to the root. Transport-agnostic: bytes in, bytes out.
    """

    def __init__(self, config: RegionalConfig, *, store: AggregatorStore, rng: np.random.Generator | None = None) -> None:
        if not isinstance(config, RegionalConfig):
            raise TypeError("config must be a RegionalConfig")
        self._store = store
        super().__init__(config=config, intake=self._make_intake(config), identity=config.region)
        if config.influence.unsafe:
            logger.warning("region %s: influence norm='unbounded': one device can move the model as far as it likes (unsafe)",
                           config.region)
        self._regional = config
        #: The frame versions the tier above announced in its last model (None: version 1 only); the
        #: aggregate is sealed in the highest one both read (docs/protocol.md, "Frames").
        self._parent_frames: tuple[int, ...] | None = None
        #: FedFomo: every device's latest model (in memory; refills from uploads after a restart).
        self.candidates = CandidatePool()
        self._rng = rng if rng is not None else np.random.default_rng()
        self._answered: Counter[tuple[str, int]] = Counter()

    def _make_intake(self, config: AggregatorConfig) -> UpdateIntake:
        """Devices' sealed updates in, bounded (a middle tier overrides this: children's aggregates in)."""
        if not isinstance(config, RegionalConfig):
            raise TypeError("config must be a RegionalConfig")
        return UpdateIntake(
            config=config,
            store=self._store,
            identity=config.region,
            kind=MessageKind.UPDATE,
            region=config.region,
            sender_keys=config.device_keys,
            aggregation=config.aggregation,
            weight_of=lambda header: float(header.sample_count),
            influence=config.influence,
        )

    @property
    def config(self) -> RegionalConfig:
        """The configuration in force (it changes when the region adopts another bundle version)."""
        return self._regional

    def adopt(self, config: AggregatorConfig) -> None:
        """Run another bundle version (see :meth:`AggregatorTier.adopt`); FedFomo's pool of the old version is emptied."""
        if not isinstance(config, RegionalConfig):
            raise TypeError("config must be a RegionalConfig")
        super().adopt(config)
        self._regional = config
        self.candidates = CandidatePool()

    @classmethod
    def open(cls, path: str | os.PathLike[str], config: RegionalConfig, *, member: str = "main",
             rng: np.random.Generator | None = None) -> RegionalAggregator:
        """Open (or create) the region's SQLite store at ``path`` as ``member`` and resume where it stood.

        ``rng`` picks random FedFomo candidates (None: fresh entropy).
        """
        return open_with_store(path, identity=f"region:{config.fleet}/{config.region}", member=member,
                               build=lambda store: cls(config, store=store, rng=rng))

    def start_round(self, round: int, global_params: Mapping[str, np.ndarray]) -> bytes:
        """Start ``round`` from the global model G_r: the model S_r signed for the region's devices.

        Idempotent for the current round; ModelRejectedError ``stale_round`` for an older one.
        """
        return self._start(round, global_params, self._serve)

    def handle_root_model(self, blob: bytes | bytearray | memoryview) -> bytes:
        """Verify the root's signed global model (or, with a ``parent``, that tier's model), start its round, and
        return the mixed model signed for devices.

        ModelRejectedError (counted as ``model_rejected:<reason>``) when the
        signature does not verify (``auth``, nothing more said), the model is
        malformed, for another fleet, a regional rather than a global model,
        for another bundle version, has other parameters, or is older than
        the current round.
        """
        try:
            opened = open_model(blob, trusted_signers=self._regional.root_verify_key, limits=self._config.decode_limits())
        except AuthenticationError:
            raise self._reject_model("auth", "") from None
        except MalformedMessageError as exc:
            raise self._reject_model("malformed", str(exc)) from exc
        header = opened.header
        if header.fleet != self._config.fleet:
            raise self._reject_model("fleet", f"model for fleet {header.fleet!r}")
        if header.region != self._regional.parent:
            expected = "a global model" if self._regional.parent is None else f"the model of {self._regional.parent!r}"
            raise self._reject_model("region", f"a model for region {header.region!r}, not {expected}")
        if header.bundle_version != self._config.bundle_version:
            # The service switches versions (adopt) when it holds that bundle, then hands the model in again.
            raise self._reject_model("bundle_version", f"model for bundle v{header.bundle_version}, this region runs "
                                     f"v{self._config.bundle_version}")
        try:
            params = conform_params(self._config.spec, opened.tensors, what="global model")
        except (TypeError, ValueError) as exc:
            raise self._reject_model("params", str(exc)) from exc
        self._parent_frames = header.frames
        return self.start_round(header.round, params)

    def handle_update(self, blob: bytes | bytearray | memoryview, *, topic_device: str | None = None) -> HandledUpdate:
        """Authenticate, validate and durably count one sealed device update; never raises for bad input.

        ``topic_device``: the device id from the topic it arrived on (None:
        unchecked); an update signed by another device is refused as ``auth``.
        """
        return self.handle_updates([IncomingUpdate(blob=blob, topic_sender=topic_device)])[0]

    def handle_updates(self, items: Sequence[IncomingUpdate]) -> list[HandledUpdate]:
        """:meth:`handle_update` for several updates with one commit (group commit, docs/aggregation.md):
        one answer per item, in order; no receipt of the batch exists before every accepted update is durable."""
        answers = self._intake.handle_batch(items)
        record = self._intake.record
        if self._regional.fomo_candidates and record is not None:
            for handled in answers:
                if handled.delta is not None and handled.header is not None and record.round == handled.header.round:
                    self.candidates.record(handled.header.sender, record.round, apply_delta(record.base_params, handled.delta))
        return answers

    @property
    def fomo_enabled(self) -> bool:
        """True when the region serves FedFomo candidates (``fomo_candidates`` > 0)."""
        return self._regional.fomo_candidates > 0

    def handle_candidate_request(self, blob: bytes | bytearray | memoryview, *, topic_device: str | None = None) -> CandidateAnswer:
        """Verify a device's signed FedFomo request and seal up to ``k`` peers' models to its reply key; never raises for bad input.

        Refusals are counted as ``candidates_rejected:<reason>`` and logged; an
        empty pool answers with zero candidates (the device then just trains).
        """
        config = self._regional
        if not config.fomo_candidates:
            return self._refuse_request("fomo_off", "FedFomo is off in this region", None)
        try:
            request = open_candidate_request(blob, device_keys=config.device_keys, fleet=config.fleet, region=config.region)
        except AuthenticationError:
            return self._refuse_request("auth", f"{len(blob)} bytes", None)
        except MalformedMessageError as exc:
            return self._refuse_request("malformed", str(exc), None)
        if topic_device is not None and topic_device != request.device:
            return self._refuse_request("auth", f"request of {request.device} on the topic of {topic_device}", None)
        state = self._intake.state
        if state is None or request.round != state.round:
            current = None if state is None else state.round
            return self._refuse_request("wrong_round", f"round {request.round}, current {current}", request.device)
        key = (request.device, request.round)
        if self._answered[key] >= config.fomo_requests_per_round:
            return self._refuse_request("too_many", f"already answered {self._answered[key]} times", request.device)
        chosen = self.candidates.choose(request.device, min(request.k, config.fomo_candidates), prefer=request.prefer, rng=self._rng)
        header = CandidatesHeader.create(
            fleet=config.fleet, sender=config.region, region=config.region, recipient=request.device, round=request.round,
            bundle_version=config.bundle_version, request_nonce=request.nonce,
            peers=tuple(c.device for c in chosen), peer_rounds=tuple(c.round for c in chosen), clock=config.wall_clock,
        )
        try:
            sealed = seal_candidates(header, [c.params for c in chosen], signer_key=config.signing_key,
                                     recipient_public_key=X25519PublicKey.from_public_bytes(request.reply_key))
        except ValueError as exc:  # a low-order reply key: no shared secret
            return self._refuse_request("malformed", f"unusable reply key: {exc}", request.device)
        if len(self._answered) >= MAX_ANSWER_KEYS:
            self._answered = Counter({k: n for k, n in self._answered.items() if k[1] >= state.round})
        self._answered[key] += 1
        self._intake.count("candidates_served")
        logger.info("round %d: served %d FedFomo candidates to %s", request.round, len(chosen), request.device)
        return CandidateAnswer(device=request.device, blob=sealed, peers=header.peers)

    def _refuse_request(self, reason: str, detail: str, device: str | None) -> CandidateAnswer:
        self._intake.count(f"candidates_rejected:{reason}")
        logger.warning("refused a candidate request from %s: %s (%s)", device or "an unauthenticated sender", reason, detail)
        return CandidateAnswer(device=device, blob=None, reason=reason)

    def close_round(self) -> RegionalAggregate:
        """Close the current round: D_r, its counts, R_r, and the aggregate sealed for the root.

        Idempotent: closing a closed round returns what closing it produced
        (the same sealed bytes, so a resend after a crash is a duplicate at the
        root). RoundStateError before the first round.
        """
        with self._intake.write_transaction():
            record = self._intake.store.load_round()
            if record is None:
                raise RoundStateError("no round has started")
            closing = record.closing
            if closing is None:
                merged = self._intake.merge(record.round)
                sealed = self._seal(record.round, merged)
                closing = ClosedRound(
                    mean_delta=merged.mean_delta,
                    update_count=merged.update_count,
                    sample_count=merged.sample_count,
                    result_params=apply_delta(record.base_params, merged.mean_delta),
                    result_blob=None if sealed is None else sealed[1],
                    result_nonce=None if sealed is None else sealed[0],
                )
                self._intake.store.close_round(record.round, closing)
                logger.debug("round %d closed: %d updates, %d samples", record.round, merged.update_count, merged.sample_count)
        self._intake.refresh()
        return RegionalAggregate(
            round=record.round,
            mean_delta=closing.mean_delta,
            update_count=closing.update_count,
            sample_count=closing.sample_count,
            regional_params=closing.result_params if closing.result_params is not None else record.base_params,
            blob=closing.result_blob,
        )

    def pending_aggregate(self) -> bytes | None:
        """The closed round's sealed aggregate while the root has not answered it (resend it), else None.

        Read from the store each time: another member may have stored the answer."""
        return self._intake.store.unanswered_aggregate()

    def handle_root_receipt(self, blob: bytes | bytearray | memoryview) -> ForwardAnswer:
        """Verify the root's signed receipt and, when it answers the stored aggregate, record it durably
        (the first answer stands); see :func:`~sdk.aggregator.forwarding.settle_forward`. Never raises for bad input."""
        return settle_forward(self._intake, blob, root_verify_key=self._regional.root_verify_key,
                              fleet=self._config.fleet, region=self._regional.region)

    def _serve(self, record: RoundRecord | None, round: int, global_params: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bytes]:
        previous = None
        if record is not None:
            # R_{r-1}: the closed round's result, or (abandoned round) the model it served.
            closed = record.closing.result_params if record.closing is not None else None
            previous = closed if closed is not None else record.base_params
        if previous is not None and {n: v.shape for n, v in previous.items()} != {n: v.shape for n, v in global_params.items()}:
            # The round before ran another bundle version: mix only what carries over (same name and shape).
            previous = carry_parameters(previous, global_params).params
        served = mix_regional(previous, global_params, regional_weight=self._regional.regional_weight)
        return served, self._sign_model(round=round, params=served, region=self._regional.region)

    def _contributors(self, round: int) -> list[tuple[str, int]]:
        """(device, bounded weight) of every update counted in ``round``: the aggregate's ``@contributors``."""
        return self._intake.store.contributions(round)

    def _seal(self, round: int, merged: MergedRound) -> tuple[bytes, bytes] | None:
        """(nonce, sealed aggregate) for the root, the contributor list inside; None when nothing was accepted."""
        if merged.mean_delta is None:
            return None
        header = UpdateHeader.create(
            kind=MessageKind.AGGREGATE,
            fleet=self._config.fleet,
            sender=self._regional.region,
            region=self._regional.region,
            round=round,
            bundle_version=self._config.bundle_version,
            sample_count=merged.sample_count,
            clock=self._config.wall_clock,
        )
        tensors = dict(merged.mean_delta)
        tensors[CONTRIBUTORS_TENSOR] = encode_contributors(self._contributors(round))
        return header.nonce, seal_update(
            header,
            tensors,
            recipient_public_key=self._regional.root_encryption_key,
            sender_key=self._config.signing_key,
            frame_version=choose_frame_version(self._parent_frames),
        )
