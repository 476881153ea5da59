"""The device agent: one method per phase of a round, and a loop that plays rounds.

A round, from the device's side (docs/device-agent.md has the full argument):

1. :meth:`DeviceAgent.wait_for_model`: the retained, signed model on
   ``model/global``, verified against the trusted signers, for this fleet,
   region and bundle version, not older than anything seen (rollback) and
   newer than the last round the device finished.
2. :meth:`DeviceAgent.train_round`: adopt it (with FedFomo: as the delta
   reference, combining peers' models first), train within the budget, save
   the trainer state.
3. :meth:`DeviceAgent.seal_update`: compress the shared delta as the bundle
   says (error feedback: the residual it did not send is saved first and
   added to the next delta), encrypt it to the region's aggregator, sign it
   with the device key, and persist the exact bytes as the pending update
   *before* anything is published.
4. :meth:`DeviceAgent.submit`: publish, wait for the signed receipt naming
   the update's nonce, resend the same bytes on timeout (the aggregator
   deduplicates by nonce), record the receipt and clear the pending update.

A restart finds the pending update and resends it instead of training again;
a crash between saving the trainer and sealing re-seals the saved delta; a
crash during training retrains from the last saved state.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np

from device_agent.compression import CompressedTensor, CompressionSpec, compress_delta, residual_for
from device_agent.compression.feedback import ResidualState
from device_agent.daemon.agent_state import AgentProgress, AgentStateFiles, SealedUpdate
from device_agent.daemon.backoff import Backoff
from device_agent.daemon.config import AgentConfig
from device_agent.daemon.connection import InboundMessage, MqttConnection
from device_agent.daemon.fomo_client import FomoClient
from device_agent.daemon.errors import AgentStopped, ReceiptTimeoutError
from device_agent.daemon.intake import MessageIntake
from device_agent.daemon.keyring import DeviceKeys
from device_agent.daemon.status_reporter import StatusReporter
from device_agent.daemon.version_switch import Switched, VersionSwitch
from device_agent.data import DataSource
from device_agent.errors import TrainingError
from device_agent.local_round import LocalUpdate, train_local_round
from device_agent.protocol import envelope
from device_agent.protocol.chunking import PayloadTooLargeError
from device_agent.protocol.envelope import OpenedModel
from device_agent.protocol.headers import UpdateHeader
from device_agent.protocol.receipts import Receipt, ReceiptStatus
from device_agent.protocol.status import DeviceStatus, ReleaseState, ReleaseStatus, short_text
from device_agent.protocol.validation import RejectReason
from device_agent.release.client import ReleaseClient
from device_agent.release.release_state import ReleaseReport
from device_agent.state_store import ResidualFile
from device_agent.trainer import DeviceTrainer, TrainReport

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 1.0
_NOT_TRAINED = TrainReport(steps=0, examples=0, mean_loss=float("nan"), seconds=0.0)


class RoundStatus(str, Enum):
    """How a round ended for the device.

    ``duplicate``: a resend was answered ``replay``, which the aggregator says
    only for a nonce it already counted, so an earlier copy was accepted.
    ``stale``: answered ``stale_round``: the aggregator had already moved on to
    a later round (docs/protocol.md, "Rounds, resends and replays"). The update
    may have been counted before its receipt was lost; either way the round is
    over for the device, which drops it and takes the next model.
    ``no_receipt``: nothing answered; the update stays pending and is resent.
    ``refused``: the update could not be published (over the broker limit with chunking off).
    ``failed``: local training failed (unreadable data, non-finite loss); the round is skipped.
    ``wrong_version``: answered ``wrong_bundle_version``: the region runs another bundle version
    (a switch at a round boundary); the round is over and the device looks for a release at once.
    """

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    STALE = "stale"
    REJECTED = "rejected"
    NO_RECEIPT = "no_receipt"
    REFUSED = "refused"
    FAILED = "failed"
    WRONG_VERSION = "wrong_version"


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    """One attempt at one round. ``trained`` False: a pending or saved update was sent instead.

    ``reason``: the aggregator's reason code (rejected) or why nothing was sent (refused, failed), else empty.
    ``report`` None when nothing was trained; ``receipt`` None when none came.
    """

    round: int
    status: RoundStatus
    trained: bool
    reason: str = ""
    report: TrainReport | None = None
    receipt: Receipt | None = None


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """What :meth:`DeviceAgent.run` did; ``stopped`` True when its stop event ended it."""

    rounds: tuple[RoundResult, ...]
    stopped: bool

    @property
    def finished(self) -> int:
        """Rounds that ended (any status but ``no_receipt``)."""
        return sum(r.status is not RoundStatus.NO_RECEIPT for r in self.rounds)


class DeviceAgent:
    """Plays federated rounds for one device over a :class:`MqttConnection`.

    Build one from a config with :func:`device_agent.daemon.bootstrap.open_agent`.
    ``load_data`` is called for every round, so new local data is picked up.
    ``clock`` (monotonic s) drives timeouts, ``wall_clock`` stamps headers,
    ``rng`` jitters backoff, ``random_bytes`` makes nonces and ``train_rng``
    shuffles batches (None: in order). All methods run on the caller's
    thread; the connection's network thread only feeds :attr:`MqttConnection.inbox`.
    ``status`` keeps the device's signed status (None: one that publishes nothing);
    the agent updates it after training and after each round, and measures
    validation accuracy on ``load_validation``'s data when it is given.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        keys: DeviceKeys,
        trainer: DeviceTrainer,
        load_data: Callable[[], DataSource],
        connection: MqttConnection,
        state: AgentStateFiles,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        train_rng: np.random.Generator | None = None,
        load_validation: Callable[[], DataSource] | None = None,
        status: StatusReporter | None = None,
        release: ReleaseClient | None = None,
        switch: VersionSwitch | None = None,
    ) -> None:
        self.config = config
        self.keys = keys
        self.trainer = trainer
        self.connection = connection
        self.state = state
        self._load_data = load_data
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng if rng is not None else random.Random()
        self._random_bytes = random_bytes
        self._train_rng = train_rng
        self._topics = config.topics
        self._update_topic = self._topics.device_update(config.device_id)
        self._receipt_topic = self._topics.device_receipt(config.device_id)
        self._bundle_version = trainer.manifest.bundle_version
        #: What the bundle asks devices to send up (``none``: the float32 delta in ``config.encoding``).
        self.compression = CompressionSpec.parse(trainer.manifest.compression or "none")
        #: The round and spec a model's ``compression`` field asked for (None: the bundle decides).
        self._round_compression: tuple[int, CompressionSpec] | None = None
        self._residual = ResidualFile(state.directory / "residual.bin")
        self._progress = state.load_progress()
        if self._progress.bundle_version != self._bundle_version:
            if self._progress.bundle_version >= 0:
                logger.info("bundle v%d replaced v%d: round progress starts afresh", self._bundle_version,
                            self._progress.bundle_version)
            self._save_progress(AgentProgress(bundle_version=self._bundle_version))
        #: The device's status (published by the connection: retained, signed, with a signed offline will).
        self.status = status if status is not None else StatusReporter(
            fleet=config.fleet, region=config.region, device=config.device_id, signing_key=keys.signing_key)
        self._load_validation = load_validation
        #: The release client (None: releases are not followed) and what performs its version switches.
        self.release = release
        self._switch = switch
        self._told_foreign: int | None = None
        self._build_intake(self._progress.highest_model_round)
        self._stop = threading.Event()
        self._started = False
        if release is not None:
            release.on_report = self._on_release_report
            self._on_release_report(release.memory.report)  # what the last run said, until something changes

    def _build_intake(self, rollback_floor: int) -> None:
        """The message intake (and FedFomo's client) for the bundle the trainer runs."""
        old = getattr(self, "intake", None)
        self.intake = MessageIntake(
            inbox=self.connection.inbox,
            topics=self._topics,
            device_id=self.config.device_id,
            region=self.config.region,
            bundle_version=self._bundle_version,
            spec=self.trainer.manifest.shared_spec(),
            model_signers=self.keys.model_signers,
            receipt_signers=self.keys.receipt_signers,
            clock=self._clock,
        )
        if old is not None:
            self.intake.ignored.update(old.ignored)
        self.intake.rollback_floor = rollback_floor
        self.intake.follow_full = self._follow_full
        self._follow_full(True)  # nothing held yet: the full model first, then deltas once one applies
        if self.release is not None:
            self.intake.extra = self._take_release_message
        #: FedFomo's device side (None when ``fomo_candidates`` is 0).
        self.fomo = None if not self.config.fomo_candidates else FomoClient(
            self.config, keys=self.keys, trainer=self.trainer, connection=self.connection, intake=self.intake,
            pump=self._pump, load_validation=self._load_validation, rng=np.random.default_rng(self._rng.getrandbits(64)),
            clock=self._clock, wall_clock=self._wall_clock, random_bytes=self._random_bytes)

    def _follow_full(self, wanted: bool) -> None:
        """Subscribe to the full model (``wanted``) or leave it to the deltas; kept across reconnects."""
        topic = self._topics.global_model
        subscribed = self.connection.subscriptions
        if wanted == (topic in subscribed):
            return
        if wanted:
            self.connection.subscriptions = subscribed + (topic,)
            self.connection.subscribe([topic])
            logger.info("taking the full model from %s", topic)
        else:
            self.connection.subscriptions = tuple(t for t in subscribed if t != topic)
            self.connection.unsubscribe([topic])
            logger.info("following the model deltas: no full model from %s until one is needed", topic)

    def _take_release_message(self, message: InboundMessage) -> bool:
        """Give a release topic's message to the release client (True: it was one)."""
        if self.release is None or not self.release.handles(message.topic):
            return False
        self.release.handle(message)
        return True

    def update_status(self, **changes: object) -> DeviceStatus:
        """Change fields of the device's status and publish it (see :meth:`StatusReporter.update`).

        The hook for code that runs beside the rounds, e.g. a release:
        ``agent.update_status(release={"state": "fetching", "version": 3, "progress": 40})``.
        """
        return self.status.update(**changes)

    @property
    def progress(self) -> AgentProgress:
        """The durable progress (bundle, last round done, rollback floor, last receipt)."""
        return self._progress

    def start(self) -> None:
        """Start the connection (idempotent)."""
        if not self._started:
            self.connection.start()
            self._started = True

    def close(self, *, graceful: bool = True) -> None:
        """Close the connection for good (``graceful`` False drops it so the broker publishes the will)."""
        self.connection.close(graceful=graceful)
        self._started = False

    def __enter__(self) -> DeviceAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- phase 1: the model -----------------------------------------------------------------

    def wait_for_model(self, timeout: float, *, after_round: int | None = None) -> OpenedModel | None:
        """The newest acceptable model for a round after ``after_round`` (None: the last round done).

        Returns None when none came within ``timeout`` seconds; raises
        AgentStopped when the stop event of :meth:`run` is set.
        """
        floor = self._progress.completed_round if after_round is None else after_round

        def ready() -> bool:
            model = self.intake.latest_model
            return model is not None and model.header.round > floor

        model = self.intake.latest_model if self._pump(self._clock() + timeout, ready) else None
        if model is not None and model.header.round > self._progress.highest_model_round:
            self._save_progress(replace(self._progress, highest_model_round=model.header.round))
            self.intake.rollback_floor = model.header.round
        return model

    # -- phase 2: training ------------------------------------------------------------------

    def train_round(self, model: OpenedModel) -> LocalUpdate:
        """Adopt ``model``, train on fresh local data within the budget, then save the trainer state.

        With FedFomo on, the model becomes the delta reference and the device
        trains its FedFomo combination instead (:class:`FomoClient`).
        TrainingError when the data cannot be read or training fails; nothing is saved then.
        """
        data = self._local_data()
        self._round_compression = None if model.header.compression is None else (
            model.header.round, CompressionSpec.parse(model.header.compression))
        if self.fomo is not None:
            self.fomo.prepare_round(model)
        update = train_local_round(
            self.trainer,
            data,
            global_params=model.tensors if self.fomo is None else None,
            round_number=model.header.round,
            budget=self.config.budget,
            rng=self._train_rng,
            validation=self._choice_validation(),
        )
        self.trainer.save_state()
        logger.info("round %d: trained %d steps on %d examples (mean loss %.4f)",
                    update.round_number, update.report.steps, update.num_examples, update.report.mean_loss)
        if update.choice is not None:
            logger.info("round %d: serving %s (personal weight %.1f), chosen on %d validation examples",
                        update.round_number, update.choice.picked, update.choice.alpha, update.choice.examples)
        return update

    def _choice_validation(self) -> DataSource | None:
        """Validation data for a device with a personal model (Ditto) to choose what it serves; None otherwise."""
        if not self.trainer.has_personal_model or self._load_validation is None:
            return None
        try:
            return self._load_validation()
        except (OSError, ValueError) as exc:
            logger.warning("cannot load the validation data; the served model stays as it was: %s", exc)
            return None

    # -- phase 3: sealing -------------------------------------------------------------------

    def seal_update(self, update: LocalUpdate) -> SealedUpdate:
        """Compress the delta (if the bundle says so), encrypt it to the aggregator, sign it, persist it as pending.

        The new residual is saved before the update, together with the one the
        round started from, so a crash anywhere re-seals from the same residual.
        """
        tensors, encoding = self._compress(update)
        header = UpdateHeader.create(
            clock=self._wall_clock,
            random_bytes=self._random_bytes,
            fleet=self.config.fleet,
            region=self.config.region,
            sender=self.config.device_id,
            round=update.round_number,
            bundle_version=self._bundle_version,
            sample_count=update.num_examples,
            encoding=encoding,
        )
        blob = envelope.seal_update(
            header, tensors, recipient_public_key=self.keys.aggregator_key, sender_key=self.keys.signing_key
        )
        sealed = SealedUpdate(header=header, blob=blob)
        self.state.save_pending(sealed)
        return sealed

    def compression_for(self, round: int) -> CompressionSpec:
        """The uplink compression of ``round``: the override its model named, else the bundle's field."""
        override = self._round_compression
        return override[1] if override is not None and override[0] == round else self.compression

    def _compress(self, update: LocalUpdate) -> tuple[dict[str, np.ndarray | CompressedTensor], str]:
        """What to seal and its encoding: the float32 delta, or the round's compression with error feedback."""
        spec = self.compression_for(update.round_number)
        if not spec.enabled and not self.compression.enabled:
            return update.delta, self.config.encoding.value
        before = residual_for(self._residual.load(), bundle_version=self._bundle_version, round=update.round_number)
        out = compress_delta(update.delta, before, spec)
        self._residual.save(ResidualState(bundle_version=self._bundle_version, round=update.round_number,
                                          before=before or {}, after=out.residual))
        return out.tensors, spec.encoding

    # -- phase 4: submitting ----------------------------------------------------------------

    def submit(self, sealed: SealedUpdate) -> Receipt:
        """Publish ``sealed`` until a signed receipt answers it; the receipt, accepted or rejected.

        Every attempt sends the same bytes and waits ``receipt_timeout_s``;
        between attempts a backoff delay passes, still listening, so a late
        receipt counts. ReceiptTimeoutError after ``max_attempts`` (the update
        stays pending); PayloadTooLargeError when it may not be published.
        """
        header = sealed.header
        backoff = Backoff(self.config.backoff, rng=self._rng)

        def answered() -> bool:
            return self.intake.receipt_for(header) is not None

        for attempt in range(1, self.config.max_attempts + 1):
            deadline = self._clock() + self.config.receipt_timeout_s
            if not answered():
                if self.connection.wait_connected(max(0.0, deadline - self._clock())):
                    ticket = self.connection.publish_checked(self._update_topic, sealed.blob, qos=1)
                    logger.info("round %d: sent update %s (%d bytes, %d frame(s)), attempt %d/%d", header.round,
                                header.nonce.hex(), len(sealed.blob), ticket.frames, attempt, self.config.max_attempts)
                else:
                    logger.warning("round %d: not connected, attempt %d/%d skipped", header.round, attempt,
                                   self.config.max_attempts)
            if self._pump(deadline, answered):
                break
            if attempt < self.config.max_attempts and self._pump(self._clock() + backoff.next_delay(), answered):
                break
        else:
            raise ReceiptTimeoutError(header.round, self.config.max_attempts)
        found = self.intake.receipt_for(header)
        if found is None:  # unreachable: the loop above ended on answered()
            raise ReceiptTimeoutError(header.round, self.config.max_attempts)
        receipt, raw = found
        self._finish_round(header.round, raw)
        if receipt.status is ReceiptStatus.REJECTED:
            logger.warning("round %d: update %s rejected by %s: %s", header.round, header.nonce.hex(), receipt.issuer,
                           receipt.reason)
        return receipt

    # -- a whole round, and the loop ---------------------------------------------------------

    def complete_round(self, model: OpenedModel) -> RoundResult:
        """Play round ``model.header.round``: resume a pending or trained update, or train one, then submit it.

        The status says ``trained`` (with the loss and validation accuracy)
        once training ended, then how the round ended.
        """
        result = self._play_round(model)
        self.status.update(last_round=result.round, last_round_status=result.status.value,
                           last_round_reason=result.reason)
        return result

    def _play_round(self, model: OpenedModel) -> RoundResult:
        number = model.header.round
        report = None
        try:
            sealed = self._resume(number)
            if sealed is None:
                update = self.train_round(model)
                report = update.report
                self._report_training(number, report)
                sealed = self.seal_update(update)
        except TrainingError as exc:
            # Skipping the round (rather than crashing) keeps a device with bad data from
            # restarting into the same failure; the next model gets a fresh attempt.
            logger.error("round %d: training failed, skipping the round: %s", number, exc)
            self._finish_round(number, None)
            return RoundResult(round=number, status=RoundStatus.FAILED, trained=False, reason=str(exc))
        trained = report is not None
        try:
            receipt = self.submit(sealed)
        except ReceiptTimeoutError as exc:
            logger.warning("round %d: %s; the update stays pending", number, exc)
            return RoundResult(round=number, status=RoundStatus.NO_RECEIPT, trained=trained, report=report)
        except PayloadTooLargeError as exc:
            logger.error("round %d: update not sent: %s", number, exc)
            self._finish_round(number, None)
            return RoundResult(round=number, status=RoundStatus.REFUSED, trained=trained, reason=str(exc), report=report)
        if receipt.status is ReceiptStatus.ACCEPTED:
            status = RoundStatus.ACCEPTED
        elif receipt.reason == RejectReason.REPLAY.value:
            status = RoundStatus.DUPLICATE
        elif receipt.reason == RejectReason.STALE_ROUND.value:
            status = RoundStatus.STALE
        elif receipt.reason == RejectReason.WRONG_BUNDLE_VERSION.value:
            status = RoundStatus.WRONG_VERSION
            logger.warning("round %d: the region runs another bundle version than v%d (%s); looking for a release",
                           number, self._bundle_version, receipt.reason)
        else:
            status = RoundStatus.REJECTED
        return RoundResult(round=number, status=status, trained=trained, reason=receipt.reason, report=report,
                           receipt=receipt)

    def run(self, *, max_rounds: int | None = None, stop_event: threading.Event | None = None) -> RunResult:
        """Play rounds until ``max_rounds`` have finished (None: forever) or ``stop_event`` is set.

        A round without a receipt is retried after a backoff pause (the same
        pending bytes), unless a newer model arrives during the pause.
        """
        if max_rounds is not None and max_rounds < 0:
            raise ValueError("max_rounds must be >= 0 or None")
        self.start()
        self._stop = stop_event if stop_event is not None else threading.Event()
        results: list[RoundResult] = []
        pause = Backoff(self.config.backoff, rng=self._rng)
        try:
            while max_rounds is None or sum(r.status is not RoundStatus.NO_RECEIPT for r in results) < max_rounds:
                self.between_rounds()
                model = self.wait_for_model(_IDLE_WAIT_S)
                if model is None:
                    continue
                result = self.complete_round(model)
                results.append(result)
                if result.status is RoundStatus.NO_RECEIPT:
                    self.wait_for_model(pause.next_delay(), after_round=result.round)
                else:
                    pause.reset()
        except AgentStopped:
            return RunResult(rounds=tuple(results), stopped=True)
        finally:
            self._stop = threading.Event()
        return RunResult(rounds=tuple(results), stopped=False)

    # -- releases, between rounds ------------------------------------------------------------

    def between_rounds(self) -> Switched | None:
        """The release step (never mid-round, see :class:`VersionSwitch`); the switch made, None when nothing changed."""
        if self._switch is None:
            return None
        switched = self._switch.step(self.trainer)
        if switched is not None and switched.trainer is not self.trainer:
            self._adopt(switched)
        foreign = self.intake.foreign_version
        if switched is None and foreign is not None and foreign != self._told_foreign:
            self._told_foreign = foreign  # said once per version: the models of the region are for another bundle
            logger.warning("the region's models are for bundle v%d, this device runs v%d: it sits out the rounds until "
                           "both run one version (a canary until its release is promoted; otherwise the release its "
                           "status names, or why it refused it)", foreign, self._bundle_version)
        return switched

    def _adopt(self, switched: Switched) -> None:
        """Play rounds with the switched trainer (another bundle version) from now on: fresh progress, intake and
        pending state; the status names the new bundle and the trial's loss and accuracy."""
        trainer = switched.trainer
        logger.info("now running bundle %s v%d", trainer.manifest.model_name, trainer.manifest.bundle_version)
        self.trainer = trainer
        self._bundle_version = trainer.manifest.bundle_version
        self.state.clear_pending()
        self._save_progress(AgentProgress(bundle_version=self._bundle_version))
        foreign = self.intake.foreign_model
        self._build_intake(-1)
        if foreign is not None:  # the region already serves this version: play its round now, not the next one
            self.intake.replay_model(foreign)
        changes: dict[str, object] = {"bundle_model": trainer.manifest.model_name, "bundle_version": self._bundle_version}
        if switched.loss is not None:
            changes.update(last_loss=switched.loss, last_val_accuracy=switched.accuracy)
        self.update_status(**changes)

    def _on_release_report(self, report: ReleaseReport) -> None:
        """Show the release client's report in the device status (the release sub-record)."""
        self.update_status(release=ReleaseStatus(state=ReleaseState(report.state), version=report.release, progress=report.progress,
                                                 reason=short_text(report.reason),
                                                 baseline_accuracy=report.baseline_accuracy))

    # -- internals ---------------------------------------------------------------------------

    def _resume(self, number: int) -> SealedUpdate | None:
        """The update to send for round ``number`` without training, if a previous run left one."""
        pending = self.state.load_pending()
        if pending is not None:
            h = pending.header
            if (h.round, h.bundle_version, h.sender, h.fleet) == (number, self._bundle_version, self.config.device_id,
                                                                   self.config.fleet):
                logger.info("round %d: resending pending update %s instead of training", number, h.nonce.hex())
                return pending
            logger.info("dropping the pending update of round %d (now at round %d)", h.round, number)
            self.state.clear_pending()
        if self.trainer.round == number:
            # The trainer saved this round's training but the process died before sealing:
            # seal the saved delta rather than train twice.
            logger.info("round %d: sealing the delta saved before a restart instead of training", number)
            delta = self.trainer.shared_delta()
            return self.seal_update(LocalUpdate(round_number=number, delta=delta, num_examples=len(self._local_data()),
                                                report=_NOT_TRAINED))
        return None

    def _report_training(self, number: int, report: TrainReport) -> None:
        """Status after training: the round, its mean loss and (with validation data) the validation accuracy."""
        accuracy = None
        if self._load_validation is not None:
            try:
                accuracy = self.trainer.evaluate(self._load_validation()).accuracy
            except (OSError, ValueError, TrainingError) as exc:
                logger.warning("round %d: validation accuracy not measured: %s", number, exc)
        self.status.update(last_round=number, last_round_status="trained", last_round_reason="",
                           last_loss=report.mean_loss, last_val_accuracy=accuracy)

    def _local_data(self) -> DataSource:
        try:
            return self._load_data()
        except (OSError, ValueError) as exc:
            raise TrainingError(f"cannot load the local data: {exc}") from exc

    def _finish_round(self, number: int, receipt: bytes | None) -> None:
        last = receipt if receipt is not None else self._progress.last_receipt
        self._save_progress(replace(self._progress, completed_round=max(self._progress.completed_round, number),
                                    last_receipt=last))
        self.state.clear_pending()

    def _save_progress(self, progress: AgentProgress) -> None:
        self.state.save_progress(progress)
        self._progress = progress

    def _pump(self, deadline: float, done: Callable[[], bool]) -> bool:
        return self.intake.pump(deadline, done, self._stop)
