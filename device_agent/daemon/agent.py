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
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from device_agent.compression import CompressionSpec
from device_agent.daemon.agent_state import AgentProgress, AgentStateFiles, SealedUpdate
from device_agent.daemon.backoff import Backoff
from device_agent.daemon.config import AgentConfig
from device_agent.daemon.connection import MqttConnection
from device_agent.daemon.fomo_client import FomoClient
from device_agent.daemon.errors import AgentStopped, ReceiptTimeoutError
from device_agent.daemon.intake import MessageIntake
from device_agent.daemon.keyring import DeviceKeys
from device_agent.daemon.release_follower import ReleaseFollower
from device_agent.daemon.round_result import RoundResult, RoundStatus, RunResult, status_for_receipt
from device_agent.daemon.round_training import RoundTraining
from device_agent.daemon.status_reporter import StatusReporter
from device_agent.daemon.update_sealer import UpdateSealer
from device_agent.daemon.update_sender import UpdateSender
from device_agent.daemon.version_switch import Switched, VersionSwitch
from device_agent.data import DataSource
from device_agent.errors import TrainingError
from device_agent.local_round import LocalUpdate
from device_agent.protocol.chunking import PayloadTooLargeError
from device_agent.protocol.envelope import OpenedModel
from device_agent.protocol.receipts import Receipt, ReceiptStatus
from device_agent.protocol.status import DeviceStatus
from device_agent.trainer import DeviceTrainer

if TYPE_CHECKING:  # python-tuf loads with the release client, only when [release] is configured (docs/benchmarks.md)
    from device_agent.release.client import ReleaseClient

logger = logging.getLogger(__name__)

__all__ = ["DeviceAgent", "RoundResult", "RoundStatus", "RunResult"]

_IDLE_WAIT_S = 1.0


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
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng if rng is not None else random.Random()
        self._random_bytes = random_bytes
        self._topics = config.topics
        self._bundle_version = trainer.manifest.bundle_version
        #: Seals updates: the bundle's uplink compression, a model's override, the error-feedback residual.
        self.sealer = UpdateSealer(config, keys=keys, state=state, wall_clock=wall_clock, random_bytes=random_bytes,
                                   compression=CompressionSpec.parse(trainer.manifest.compression or "none"))
        self._sender = UpdateSender(config, connection=connection, clock=clock, rng=self._rng)
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
        self._training = RoundTraining(config, load_data=load_data, load_validation=load_validation,
                                       train_rng=train_rng, status=self.status)
        #: The release client (None: releases are not followed); the follower also steps the version switch.
        self.release = release
        self._releases = ReleaseFollower(release=release, switch=switch, update_status=self.update_status)
        self._build_intake(self._progress.highest_model_round)
        self._stop = threading.Event()
        self._started = False

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
            self.intake.extra = self._releases.take
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
        data = self._training.local_data()
        self.sealer.follow_model(model.header.round, model.header.compression)
        if self.fomo is not None:
            self.fomo.prepare_round(model)
        return self._training.train(self.trainer, model, data, from_model=self.fomo is None)

    # -- phase 3: sealing -------------------------------------------------------------------

    def seal_update(self, update: LocalUpdate) -> SealedUpdate:
        """Compress the delta (if the bundle says so), encrypt it to the aggregator, sign it, persist it as pending.

        The new residual is saved before the update, together with the one the
        round started from, so a crash anywhere re-seals from the same residual.
        """
        return self.sealer.seal(update, bundle_version=self._bundle_version)

    @property
    def compression(self) -> CompressionSpec:
        """What the bundle asks devices to send up (``none``: the float32 delta in ``config.encoding``)."""
        return self.sealer.compression

    def compression_for(self, round: int) -> CompressionSpec:
        """The uplink compression of ``round``: the override its model named, else the bundle's field."""
        return self.sealer.compression_for(round)

    # -- phase 4: submitting ----------------------------------------------------------------

    def submit(self, sealed: SealedUpdate) -> Receipt:
        """Publish ``sealed`` until a signed receipt answers it; the receipt, accepted or rejected.

        Every attempt sends the same bytes and waits ``receipt_timeout_s``;
        between attempts a backoff delay passes, still listening, so a late
        receipt counts. ReceiptTimeoutError after ``max_attempts`` (the update
        stays pending); PayloadTooLargeError when it may not be published.
        """
        header = sealed.header
        receipt, raw = self._sender.send(sealed, receipt_for=lambda h: self.intake.receipt_for(h), pump=self._pump)
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
        self.sealer.follow_frames(model.header.frames)
        try:
            sealed = self._resume(number)
            if sealed is None:
                update = self.train_round(model)
                report = update.report
                self._training.report(self.trainer, number, report)
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
        status = status_for_receipt(receipt)
        if status is RoundStatus.WRONG_VERSION:
            logger.warning("round %d: the region runs another bundle version than v%d (%s); looking for a release",
                           number, self._bundle_version, receipt.reason)
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
        switched = self._releases.step(self.trainer, foreign_version=self.intake.foreign_version,
                                       bundle_version=self._bundle_version)
        if switched is not None and switched.trainer is not self.trainer:
            self._adopt(switched)
        return switched

    def _adopt(self, switched: Switched) -> None:
        """Play rounds with the switched trainer (another bundle version) from now on: fresh progress, intake and
        pending state; the status names the new bundle and the trial's loss and accuracy."""
        trainer = switched.trainer
        logger.info("now running bundle %s v%d", trainer.manifest.model_name, trainer.manifest.bundle_version)
        self.trainer = trainer
        self._bundle_version = trainer.manifest.bundle_version
        self.sealer.compression = CompressionSpec.parse(trainer.manifest.compression or "none")  # the new bundle's uplink
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

    # -- internals ---------------------------------------------------------------------------

    def _resume(self, number: int) -> SealedUpdate | None:
        """The update to send for round ``number`` without training, if a previous run left one."""
        pending = self.state.pending_for(round=number, bundle_version=self._bundle_version,
                                         sender=self.config.device_id, fleet=self.config.fleet)
        if pending is not None:
            logger.info("round %d: resending pending update %s instead of training", number, pending.header.nonce.hex())
            return pending
        if self.trainer.round == number:
            # The trainer saved this round's training but the process died before sealing:
            # seal the saved delta rather than train twice.
            logger.info("round %d: sealing the delta saved before a restart instead of training", number)
            return self.seal_update(self._training.saved_update(self.trainer, number))
        return None

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
