"""One WARNING line per claimed sender and minute when a message fails authentication.

An operator whose device is refused needs to know which device the message
*said* it came from, on which topic, and whether that id is registered at
all (a misnamed ``.pub`` file) or its signature does not verify (a wrong or
rotated key): the aggregator's log says so, never the sender, which gets no
answer. Claimed ids pass the protocol's id check before they are logged.
A flood of forged messages costs one line per claimed id per interval; the
memory is bounded to ``max_senders`` ids.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from device_agent.errors import AuthenticationError
from device_agent.protocol.envelope import SenderKeys, claimed_update_header, lookup_sender

logger = logging.getLogger("sdk.aggregator.intake")

REPORT_INTERVAL_S = 60.0
MAX_SENDERS = 1024


class AuthFailureLog:
    """Rate-limited reports of authentication failures, per claimed sender (``clock``: monotonic seconds)."""

    def __init__(self, *, interval_s: float = REPORT_INTERVAL_S, max_senders: int = MAX_SENDERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval_s
        self._max = max_senders
        self._clock = clock
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def report_update(self, blob: bytes | bytearray | memoryview, *, keys: SenderKeys, topic_sender: str | None,
                      what: str = "update") -> bool:
        """:meth:`report` for a sealed update that failed to open: its claimed sender and round, unauthenticated."""
        claimed = claimed_update_header(blob)
        return self.report(claimed=None if claimed is None else claimed.sender,
                           registered=claimed is not None and _registered(keys, claimed.sender),
                           round=None if claimed is None else claimed.round, topic_sender=topic_sender,
                           size=len(blob), what=what)

    def report(self, *, claimed: str | None, registered: bool, round: int | None, topic_sender: str | None,
               size: int, what: str = "update") -> bool:
        """Count one failure; log it now unless this claimed sender was reported within the interval (True: logged)."""
        key = claimed if claimed is not None else "\x00unparsed"
        now = self._clock()
        last, held = self._last.pop(key, (None, 0))
        if last is not None and now - last < self._interval:
            self._last[key] = (last, held + 1)
            return False
        self._last[key] = (now, 0)
        while len(self._last) > self._max:
            self._last.popitem(last=False)
        more = f" ({held} more since the last report)" if held else ""
        topic = f" on the topic of {topic_sender!r}" if topic_sender is not None else ""
        if claimed is None:
            logger.warning("refused a %d-byte %s%s: authentication failed (its header does not parse)%s",
                           size, what, topic, more)
        elif registered:
            logger.warning("refused a %s claiming to be from %r (round %s)%s: authentication failed: the signature does "
                           "not verify with %r's registered key (wrong or re-keyed device key?)%s",
                           what, claimed, round, topic, claimed, more)
        else:
            logger.warning("refused a %s claiming to be from %r (round %s)%s: authentication failed: %r is not in the "
                           "registry (no %s.pub, or its key is revoked)%s", what, claimed, round, topic, claimed, claimed, more)
        return True


def _registered(keys: SenderKeys, sender: str) -> bool:
    """Whether ``sender`` has a key in ``keys``."""
    try:
        lookup_sender(keys, sender)
    except AuthenticationError:
        return False
    return True
