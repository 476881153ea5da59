"""The largest PUBLISH a device's connection may send, and what a drop says about it.

paho ignores the broker's maximum packet size: an oversized PUBLISH gets the client disconnected, and paho
resends it after every reconnect. So the connection sizes every payload against :attr:`PacketLimit.limit`
before anything reaches paho (``broker.max_packet_size``, lowered to the broker's own when its MQTT 5 CONNACK
announces a smaller one, logged once), remembers the sizes of its PUBLISHes in flight, and when the broker
drops it soon after CONNACK with one of them unacknowledged, says (one rate-limited line) that the broker's
limit is probably below ``broker.max_packet_size``. Used only by the connection's network thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from device_agent.daemon.backoff import Throttle
from device_agent.protocol.chunking import PayloadTooLargeError, check_publish_size

logger = logging.getLogger(__name__)

#: The reason a drop carries when the broker said "packet too large" (MQTT 5 reason code 0x95).
PACKET_TOO_LARGE = "Packet too large"


class PacketLimit:
    """``configured``: ``broker.max_packet_size``; ``report_interval_s``: at most one size report per this long."""

    def __init__(self, configured: int, *, report_interval_s: float, clock: Callable[[], float]) -> None:
        self.configured = configured
        #: The largest PUBLISH sent now: ``configured``, or the broker's own limit when it announced a smaller one.
        self.limit = configured
        self._in_flight: dict[int, int] = {}
        self._trouble = Throttle(report_interval_s, clock=clock)

    def fits(self, size: int, topic: str) -> bool:
        """True when a PUBLISH of ``size`` payload bytes on ``topic`` is within the limit."""
        try:
            check_publish_size(size, self.limit, topic=topic)
        except PayloadTooLargeError:
            return False
        return True

    def adopt(self, announced: int | None, *, address: str) -> None:
        """Lower the limit to what the broker announced (MQTT 5); say so once when the configuration was larger."""
        limit = self.configured if announced is None else min(self.configured, announced)
        if limit < self.limit or (announced is not None and limit != self.limit):
            if limit < self.configured and limit != self.limit:
                logger.warning("broker %s accepts packets up to %d bytes, less than broker.max_packet_size = %d: "
                               "using %d (set broker.max_packet_size to the broker's limit)",
                               address, limit, self.configured, limit)
            self.limit = limit

    def sent(self, mid: int, size: int) -> None:
        """A PUBLISH of ``size`` bytes went to paho as message ``mid``."""
        self._in_flight[mid] = size

    def acknowledged(self, mid: int) -> None:
        """The broker acknowledged message ``mid``."""
        self._in_flight.pop(mid, None)

    def explain_drop(self, reason: str, lasted: float, *, suspicious: bool, address: str, client_id: str) -> None:
        """One line when a drop looks like a packet over the broker's limit (the usual cause of a reconnect storm);
        ``suspicious``: the connection had not proved itself yet. Forgets what was in flight."""
        largest = max(self._in_flight.values(), default=0)
        self._in_flight.clear()
        explicit = reason == PACKET_TOO_LARGE
        if not explicit and (largest == 0 or not suspicious):
            return
        report, held = self._trouble.ready()
        if not report:
            return
        more = f" ({held} similar since the last report)" if held else ""
        if explicit:
            logger.error("broker %s disconnected %s for a packet too large (largest PUBLISH in flight: %d bytes, "
                         "broker.max_packet_size = %d): set broker.max_packet_size to the broker's limit%s",
                         address, client_id, largest, self.limit, more)
        else:
            logger.error("broker %s closed the connection %.1f s after CONNACK (%s) while a %d-byte PUBLISH was "
                         "unacknowledged: its packet size limit is probably below broker.max_packet_size (%d); "
                         "set broker.max_packet_size to the broker's message_size_limit%s",
                         address, lasted, reason, largest, self.limit, more)

    def forget(self) -> None:
        """The connection went down without a report: nothing is in flight any more."""
        self._in_flight.clear()
