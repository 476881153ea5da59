"""What the broker delivers to a device, verified and filed: the newest acceptable model, receipts,
and the FedFomo candidates answering the request the agent is waiting on.

The agent's loop calls :meth:`MessageIntake.pump` whenever it waits; the
connection's network thread only fills the queue. Nothing unauthenticated is
kept, and every message dropped is counted by reason in
:attr:`MessageIntake.ignored` and logged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.compression.downlink import HeldModel, apply_model_delta
from device_agent.daemon.connection import InboundMessage, drain
from device_agent.daemon.errors import AgentStopped
from device_agent.errors import AuthenticationError, MalformedMessageError
from device_agent.protocol.candidate_request import CandidateRequest
from device_agent.protocol.chunking import Reassembler, is_chunk
from device_agent.protocol.envelope import (
    OpenedCandidates,
    OpenedModel,
    open_candidates,
    open_model,
    verified_model_header,
)
from device_agent.protocol.headers import MAX_CANDIDATES, ModelHeader, UpdateHeader
from device_agent.protocol.model_delta import open_model_delta
from device_agent.protocol.receipts import Receipt, open_receipt
from device_agent.protocol.tensor_codec import DecodeLimits
from device_agent.protocol.topics import TopicLayout

logger = logging.getLogger(__name__)

_REMEMBERED_RECEIPTS = 32


class MessageIntake:
    """Verifies models and receipts for one device and keeps what passes.

    A model is kept when a trusted signer signed it for this fleet, for this
    region (or the root's, region None), for ``bundle_version``, its tensors
    match ``spec`` exactly, and its round is not below :attr:`rollback_floor`.
    Receipts must be signed by a receipt signer and name this device; the
    newest ``32`` are kept by update nonce. ``spec`` also bounds decoding, so
    even a trusted signer cannot make the device allocate more than one model.
    """

    def __init__(
        self,
        *,
        inbox: queue.Queue[InboundMessage],
        topics: TopicLayout,
        device_id: str,
        region: str,
        bundle_version: int,
        spec: Mapping[str, tuple[tuple[int, ...], str]],
        model_signers: tuple[Ed25519PublicKey, ...],
        receipt_signers: tuple[Ed25519PublicKey, ...],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inbox = inbox
        self._topics = topics
        self._device = device_id
        self._region = region
        self._bundle_version = bundle_version
        self._spec = {name: (tuple(shape), np.dtype(dtype).name) for name, (shape, dtype) in spec.items()}
        self._model_signers = model_signers
        self._receipt_signers = receipt_signers
        self._clock = clock
        self._model_topic = topics.global_model
        self._delta_topic = topics.global_model_delta
        self._receipt_topic = topics.device_receipt(device_id)
        self._limits = DecodeLimits(
            max_tensors=len(self._spec),
            max_total_bytes=sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in self._spec.values()),
        )
        self._receipts: OrderedDict[bytes, tuple[Receipt, bytes]] = OrderedDict()
        self._candidates_topic = topics.device_candidates(device_id)
        self._awaiting: tuple[CandidateRequest, X25519PrivateKey] | None = None
        self._reassembler = Reassembler(max_messages=2, max_total_bytes=MAX_CANDIDATES * self._limits.max_encoded_bytes + 8192)
        #: The verified answer to the awaited candidate request (None until it came).
        self.candidates: OpenedCandidates | None = None
        #: The newest acceptable model seen, None before the first.
        self.latest_model: OpenedModel | None = None
        #: Models older than this round are rollbacks and ignored.
        self.rollback_floor = -1
        #: Messages dropped so far, by reason (``untrusted_model``, ``model_rollback``...).
        self.ignored: Counter[str] = Counter()
        #: The bundle version of the newest trusted model for this region that was for another version (None: none).
        self.foreign_version: int | None = None
        #: That model's signed bytes, kept so a device that switches to its version can take it at once
        #: (a retained model is delivered once; the next comes only after the round closes).
        self.foreign_model: bytes | None = None
        #: Takes messages on other topics first (the release client); returns True when it consumed one.
        self.extra: Callable[[InboundMessage], bool] | None = None
        #: The newest model taken, as deltas apply to it (None before the first; a restart starts with None).
        self.held: HeldModel | None = None
        #: Called with True when the device needs the full model (no base, a delta refused, the chain restarted),
        #: False once it follows the deltas (the agent subscribes to ``model/global`` only while True).
        self.follow_full: Callable[[bool], None] = lambda wanted: None
        #: Model deltas applied so far.
        self.deltas_applied = 0

    def receipt_for(self, header: UpdateHeader) -> tuple[Receipt, bytes] | None:
        """The verified receipt answering ``header`` and its signed bytes, or None when none came."""
        found = self._receipts.get(header.nonce)
        return found if found is not None and found[0].answers(header) else None

    def expect_candidates(self, request: CandidateRequest, reply_key: X25519PrivateKey) -> None:
        """Wait for the answer to ``request`` (sealed to ``reply_key``); forgets any earlier answer."""
        self._awaiting = (request, reply_key)
        self.candidates = None

    def pump(self, deadline: float, done: Callable[[], bool], stop: threading.Event) -> bool:
        """Handle messages until ``done()`` or the ``deadline`` (on the clock); the final ``done()``.

        Everything already queued is handled before ``done()`` is asked, so
        the newest model wins. AgentStopped when ``stop`` is set.
        """
        while True:
            for message in drain(self._inbox):
                self.handle(message)
            if done():
                return True
            if stop.is_set():
                raise AgentStopped()
            left = deadline - self._clock()
            if left <= 0:
                return False
            try:
                self.handle(self._inbox.get(timeout=min(left, 0.1)))
            except queue.Empty:
                pass

    def replay_model(self, payload: bytes) -> None:
        """Verify and file a model received earlier (another intake's :attr:`foreign_model`), as if it came now."""
        self._on_model(payload)

    def handle(self, message: InboundMessage) -> None:
        """Verify and file one message (or count and log why it was dropped)."""
        if message.topic == self._model_topic:
            self._on_model(message.payload)
        elif message.topic == self._delta_topic:
            self._on_delta(message.payload)
        elif message.topic == self._receipt_topic:
            self._on_receipt(message.payload)
        elif message.topic == self._candidates_topic:
            self._on_candidates(message.payload)
        elif self.extra is not None and self.extra(message):
            return
        else:
            self._ignore("topic", "message on unexpected topic %s", message.topic)

    def _ignore(self, reason: str, fmt: str, *args: object) -> None:
        self.ignored[reason] += 1
        logger.warning("ignored (%s): " + fmt, reason, *args)

    def _on_model(self, payload: bytes) -> None:
        if is_chunk(payload):
            self._ignore("chunked_model", "models must fit in one retained message")
            return
        try:
            # The header first (signature checked): a model for another bundle version has other
            # tensors, which must be told apart from a malformed model of this version.
            h = verified_model_header(payload, trusted_signers=self._model_signers)
            if h.bundle_version != self._bundle_version and h.fleet == self._topics.fleet \
                    and h.region in (None, self._region):
                self.foreign_version = h.bundle_version
                self.foreign_model = payload
                self._ignore("model_bundle_version", "model for bundle v%d, device runs v%d", h.bundle_version,
                             self._bundle_version)
                return
            model = open_model(payload, trusted_signers=self._model_signers, limits=self._limits)
        except AuthenticationError:
            self._ignore("untrusted_model", "model not signed by a trusted signer")
            return
        except MalformedMessageError as exc:
            self._ignore("malformed_model", "%s", exc)
            return
        h = model.header
        if h.fleet != self._topics.fleet or h.region not in (None, self._region):
            self._ignore("model_scope", "model for fleet %s region %s", h.fleet, h.region)
        elif h.round < self.rollback_floor:
            self._ignore("model_rollback", "model round %d is older than round %d already seen", h.round,
                         self.rollback_floor)
        elif {n: (t.shape, t.dtype.name) for n, t in model.tensors.items()} != self._spec:
            self._ignore("model_shape", "model tensors do not match the bundle's shared parameters")
        elif self.latest_model is None or h.round >= self.latest_model.header.round:
            self._take(model, HeldModel.of(h.round, model.tensors))

    def _take(self, model: OpenedModel, held: HeldModel) -> None:
        self.latest_model = model
        self.held = held
        self.foreign_model = None  # the region serves this device's version again: nothing to replay

    def _on_delta(self, payload: bytes) -> None:
        """A model delta: applied when the device holds its base, else refused with one line and the full model
        asked for (docs/protocol.md, "Models down as compressed deltas"). An empty payload: the publisher cleared
        the delta (its chain starts over), so the next model comes in full."""
        if not payload:
            self.follow_full(True)
            return
        try:
            opened = open_model_delta(payload, trusted_signers=self._model_signers, limits=self._limits)
        except AuthenticationError:
            return self._refuse_delta("untrusted_delta", "model delta not signed by a trusted signer")
        except MalformedMessageError as exc:
            return self._refuse_delta("malformed_delta", "%s", exc)
        h = opened.header
        if h.fleet != self._topics.fleet or h.region not in (None, self._region) or h.bundle_version != self._bundle_version:
            return self._refuse_delta("delta_scope", "delta for fleet %s region %s bundle v%d", h.fleet, h.region,
                                      h.bundle_version)
        held = self.held
        if held is not None and h.round <= held.round:
            if h.round == held.round and h.digest == held.digest:
                self.follow_full(False)  # it makes what the device holds: the deltas can be followed from here
            return
        if h.round < self.rollback_floor:
            self._ignore("model_rollback", "delta round %d is older than round %d already seen", h.round, self.rollback_floor)
            return
        applied = apply_model_delta(held, opened.tensors, round=h.round, base_round=h.base_round,
                                    base_digest=h.base_digest, digest=h.digest)
        if applied.model is None:
            return self._refuse_delta(f"delta_{applied.reason}", "%s", applied.detail)
        header = ModelHeader(fleet=h.fleet, sender=h.sender, round=h.round, bundle_version=h.bundle_version,
                             region=h.region, compression=h.compression, frames=h.frames, nonce=h.nonce,
                             timestamp_ms=h.timestamp_ms)
        tensors = {n: v.copy() for n, v in applied.model.tensors.items()}  # the trainer's; ``held`` stays the base
        self._take(OpenedModel(header=header, tensors=tensors, signer_key_id=opened.signer_key_id), applied.model)
        self.deltas_applied += 1
        self.follow_full(False)

    def _refuse_delta(self, reason: str, fmt: str, *args: object) -> None:
        self._ignore(reason, fmt + "; taking the full model", *args)
        self.follow_full(True)

    def _on_receipt(self, payload: bytes) -> None:
        try:
            receipt = open_receipt(payload, trusted_signers=self._receipt_signers)
        except AuthenticationError:
            self._ignore("untrusted_receipt", "receipt not signed by a trusted aggregator")
            return
        except MalformedMessageError as exc:
            self._ignore("malformed_receipt", "%s", exc)
            return
        if (receipt.fleet, receipt.device) != (self._topics.fleet, self._device):
            self._ignore("receipt_scope", "receipt for %s/%s", receipt.fleet, receipt.device)
            return
        self._receipts[receipt.update_nonce] = (receipt, bytes(payload))
        while len(self._receipts) > _REMEMBERED_RECEIPTS:
            self._receipts.popitem(last=False)

    def _on_candidates(self, payload: bytes) -> None:
        if is_chunk(payload):
            try:
                whole = self._reassembler.add(payload, sender="region")
            except MalformedMessageError as exc:
                self._ignore("malformed_candidates", "%s", exc)
                return
            if whole is None:
                return
            payload = whole
        if self._awaiting is None:
            self._ignore("unexpected_candidates", "candidates arrived but none were asked for")
            return
        request, reply_key = self._awaiting
        limits = DecodeLimits(max_tensors=request.k * len(self._spec), max_total_bytes=request.k * self._limits.max_total_bytes)
        try:
            opened = open_candidates(payload, recipient_key=reply_key, trusted_signers=self._receipt_signers, limits=limits)
        except AuthenticationError:
            self._ignore("untrusted_candidates", "candidates not signed by a trusted aggregator or not sealed to this request")
            return
        except MalformedMessageError as exc:
            self._ignore("malformed_candidates", "%s", exc)
            return
        h = opened.header
        if (h.fleet, h.region, h.recipient, h.round, h.request_nonce) != (
                request.fleet, request.region, request.device, request.round, request.nonce) or len(h.peers) > request.k:
            self._ignore("candidates_scope", "candidates for %s/%s round %d do not answer this request", h.recipient,
                         h.region, h.round)
        elif h.bundle_version != self._bundle_version:
            self._ignore("candidates_bundle_version", "candidates for bundle v%d, device runs v%d", h.bundle_version,
                         self._bundle_version)
        elif any({n: (t.shape, t.dtype.name) for n, t in m.items()} != self._spec or not all(
                np.all(np.isfinite(t)) for t in m.values()) for m in opened.models):
            self._ignore("candidates_shape", "candidate tensors do not match the bundle's shared parameters or are not finite")
        else:
            self.candidates = opened
            self._awaiting = None
