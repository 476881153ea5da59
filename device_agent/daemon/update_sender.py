"""Phase 4 of a round: publish a sealed update until a signed receipt answers it.

Every attempt sends the same bytes (the aggregator deduplicates by nonce)
and waits ``receipt_timeout_s``; between attempts a backoff delay passes,
still listening, so a late receipt counts.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from device_agent.daemon.agent_state import SealedUpdate
from device_agent.daemon.backoff import Backoff
from device_agent.daemon.config import AgentConfig
from device_agent.daemon.connection import MqttConnection
from device_agent.daemon.errors import ReceiptTimeoutError
from device_agent.protocol.headers import UpdateHeader
from device_agent.protocol.receipts import Receipt

logger = logging.getLogger(__name__)

#: The verified receipt (and its raw bytes) answering an update's header, None while none came.
ReceiptLookup = Callable[[UpdateHeader], "tuple[Receipt, bytes] | None"]
#: Waits (handling messages) until a deadline or until the condition holds; True when it held.
Pump = Callable[[float, Callable[[], bool]], bool]


class UpdateSender:
    """Sends one device's sealed updates on its update topic and waits for their receipts."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        connection: MqttConnection,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self._config = config
        self._connection = connection
        self._clock = clock
        self._rng = rng
        self._topic = config.topics.device_update(config.device_id)

    def send(self, sealed: SealedUpdate, *, receipt_for: ReceiptLookup, pump: Pump) -> tuple[Receipt, bytes]:
        """Publish ``sealed`` until ``receipt_for`` finds its receipt; the receipt and its raw bytes.

        ReceiptTimeoutError after ``max_attempts``; PayloadTooLargeError when
        the update may not be published.
        """
        header = sealed.header
        attempts = self._config.max_attempts
        backoff = Backoff(self._config.backoff, rng=self._rng)

        def answered() -> bool:
            return receipt_for(header) is not None

        for attempt in range(1, attempts + 1):
            deadline = self._clock() + self._config.receipt_timeout_s
            if not answered():
                if self._connection.wait_connected(max(0.0, deadline - self._clock())):
                    ticket = self._connection.publish_checked(self._topic, sealed.blob, qos=1)
                    logger.info("round %d: sent update %s (%d bytes, %d frame(s)), attempt %d/%d", header.round,
                                header.nonce.hex(), len(sealed.blob), ticket.frames, attempt, attempts)
                else:
                    logger.warning("round %d: not connected, attempt %d/%d skipped", header.round, attempt, attempts)
            if pump(deadline, answered):
                break
            if attempt < attempts and pump(self._clock() + backoff.next_delay(), answered):
                break
        else:
            raise ReceiptTimeoutError(header.round, attempts)
        found = receipt_for(header)
        if found is None:  # unreachable: the loop above ended on answered()
            raise ReceiptTimeoutError(header.round, attempts)
        return found
