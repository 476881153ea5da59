"""The device's side of FedFomo over MQTT: ask the region for peers' models, combine, remember who helped.

Per round (docs/protocol.md, "FedFomo over MQTT"): adopt the served model
S_r as the delta reference (``set_global``) but keep the device's own shared
layers (a device that never trained starts from S_r); publish a signed
:class:`~device_agent.protocol.candidate_request.CandidateRequest` with a
fresh X25519 reply key and the peers :class:`PeerAffinity` prefers; wait up
to ``fomo_timeout_s`` for the sealed answer; combine with
:func:`~device_agent.local_round.combine_candidates_fomo` on the validation
split keeping S_r as reference; credit the weights to the peers. Any failure
(no validation data, no connection, no or bad answer) is logged and the
round trains the device's own model: FedFomo never fails a round.
The affinity lives in memory: after a restart it is rebuilt from scratch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.daemon.config import AgentConfig
from device_agent.daemon.connection import MqttConnection
from device_agent.daemon.intake import MessageIntake
from device_agent.daemon.keyring import DeviceKeys
from device_agent.data import DataSource
from device_agent.keys import raw_public_bytes
from device_agent.local_round import combine_candidates_fomo
from device_agent.personalization.fedfomo import FomoUpdate
from device_agent.personalization.peer_affinity import PeerAffinity
from device_agent.protocol.candidate_request import CandidateRequest, sign_candidate_request
from device_agent.protocol.chunking import PayloadTooLargeError
from device_agent.protocol.envelope import OpenedCandidates, OpenedModel
from device_agent.trainer import DeviceTrainer

logger = logging.getLogger(__name__)

#: ``pump(deadline, done)``: handle inbound messages until ``done()`` or the deadline; the final ``done()``.
Pump = Callable[[float, Callable[[], bool]], bool]


class FomoClient:
    """FedFomo for one device; ``load_validation`` None means the device has no validation split (FedFomo skipped)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        keys: DeviceKeys,
        trainer: DeviceTrainer,
        connection: MqttConnection,
        intake: MessageIntake,
        pump: Pump,
        load_validation: Callable[[], DataSource] | None,
        rng: np.random.Generator,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config
        self.affinity = PeerAffinity()
        self._keys = keys
        self._trainer = trainer
        self._connection = connection
        self._intake = intake
        self._pump = pump
        self._load_validation = load_validation
        self._rng = rng
        self._clock = clock
        self._wall_clock = wall_clock
        self._random_bytes = random_bytes
        self._topic = config.topics.device_candidate_request(config.device_id)
        self._warned_no_validation = False

    def prepare_round(self, model: OpenedModel) -> FomoUpdate | None:
        """Make S_r the reference and the FedFomo combination the weights to train; None when no combination ran."""
        number = model.header.round
        own = self._trainer.get_shared() if self._trainer.round >= 0 else None
        self._trainer.set_global(model.tensors, round_number=number)
        validation = self._validation()
        if validation is None:
            return None
        if own is not None:
            self._trainer.set_shared(own)
        answer = self.request_candidates(number)
        if answer is None or not answer.models:
            return None
        update = combine_candidates_fomo(self._trainer, answer.models, validation, round_number=number, keep_reference=True)
        self.affinity.update(answer.header.peers, update.weights)
        logger.info("round %d: FedFomo over %s, weights %s", number, ", ".join(answer.header.peers),
                    np.round(update.weights, 3).tolist())
        return update

    def request_candidates(self, number: int) -> OpenedCandidates | None:
        """Ask for up to ``fomo_candidates`` peers' models of round ``number``; None (logged) when none came in time."""
        k = self.config.fomo_candidates
        reply = X25519PrivateKey.generate()
        request = CandidateRequest.create(
            fleet=self.config.fleet, region=self.config.region, device=self.config.device_id, round=number, k=k,
            prefer=self.affinity.prefer(k, round_index=number, rng=self._rng),
            reply_key=raw_public_bytes(reply.public_key()), clock=self._wall_clock, random_bytes=self._random_bytes,
        )
        self._intake.expect_candidates(request, reply)
        deadline = self._clock() + self.config.fomo_timeout_s
        if not self._connection.wait_connected(self.config.fomo_timeout_s):
            logger.warning("round %d: not connected, training without FedFomo candidates", number)
            return None
        try:
            self._connection.publish_checked(self._topic, sign_candidate_request(request, signer_key=self._keys.signing_key))
        except PayloadTooLargeError as exc:
            logger.error("round %d: candidate request not sent: %s", number, exc)
            return None
        if not self._pump(deadline, lambda: self._intake.candidates is not None):
            logger.warning("round %d: no FedFomo candidates within %.1f s, training without", number,
                           self.config.fomo_timeout_s)
            return None
        return self._intake.candidates

    def _validation(self) -> DataSource | None:
        if self._load_validation is None:
            if not self._warned_no_validation:
                logger.warning("fomo_candidates is set but data.validation_path is not: FedFomo is skipped")
                self._warned_no_validation = True
            return None
        try:
            data = self._load_validation()
        except (OSError, ValueError) as exc:
            logger.error("cannot load the validation data, FedFomo skipped this round: %s", exc)
            return None
        if len(data) == 0:
            logger.warning("the validation data is empty: FedFomo skipped this round")
            return None
        return data
