"""The device's status as the agent keeps it: current fields, freshly signed on demand, published on change.

:class:`StatusReporter` holds the fields of the device's
:class:`~device_agent.protocol.status.DeviceStatus`. The agent (and the
rollout code, through :meth:`DeviceAgent.update_status`) changes them with
:meth:`StatusReporter.update`; every change calls the publish hook, which asks
the connection's network thread to publish a freshly signed status (retained,
QoS 1) once connected. The connection also signs one on every connect
(:meth:`online_payload`) and one as its last will and on a clean close
(:meth:`offline_payload`). Each signed status takes the next sequence number
and the current time, free memory and uptime. Thread-safe: the agent's thread
updates, the network thread signs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent import __version__
from device_agent.protocol.status import DeviceStatus, ReleaseStatus, release_changes, short_text, sign_status

logger = logging.getLogger(__name__)

_FIXED = frozenset({"protocol", "fleet", "region", "device", "sequence", "timestamp_ms", "online", "uptime_s",
                    "free_memory_bytes", "agent_version"})
_MEMINFO = Path("/proc/meminfo")


def available_memory(meminfo: Path = _MEMINFO) -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes; None where it cannot be read (not Linux, old kernel)."""
    try:
        for line in meminfo.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class StatusReporter:
    """The current status fields of one device, signed with ``signing_key`` whenever a payload is asked for.

    ``wall_clock`` stamps statuses, ``clock`` (monotonic) measures uptime,
    ``free_memory`` reads the free memory (None: unknown). ``on_change`` is
    called after every :meth:`update` (the agent wires it to
    :meth:`MqttConnection.refresh_presence`); None until :meth:`attach`.
    """

    def __init__(
        self,
        *,
        fleet: str,
        region: str,
        device: str,
        signing_key: Ed25519PrivateKey,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        free_memory: Callable[[], int | None] = available_memory,
        agent_version: str = __version__,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._key = signing_key
        self._wall_clock = wall_clock
        self._clock = clock
        self._free_memory = free_memory
        self._started = clock()
        self._lock = threading.Lock()
        self._on_change = on_change
        self._current = DeviceStatus(fleet=fleet, region=region, device=device, sequence=0,
                                     timestamp_ms=int(wall_clock() * 1000), online=False, agent_version=agent_version)
        self._signed = 0

    def attach(self, on_change: Callable[[], None]) -> None:
        """Call ``on_change`` after every update from now on (the publish hook)."""
        self._on_change = on_change

    @property
    def current(self) -> DeviceStatus:
        """The fields as they stand (``sequence``/``timestamp_ms`` are those of the last signed status)."""
        with self._lock:
            return self._current

    def update(self, **changes: Any) -> DeviceStatus:
        """Change status fields and publish (through the hook); the new current status.

        Any :class:`DeviceStatus` field but the identity, sequence, time, online,
        uptime, memory and version ones, which the reporter sets itself.
        ``release`` may be a whole :class:`ReleaseStatus` or a mapping of some
        of its fields (``update(release={"state": "fetching", "progress": 40})``).
        Reasons are cut to one printable line (:func:`short_text`). ValueError
        for an unknown field or a bad value (nothing changes then).
        """
        fixed = _FIXED & set(changes)
        if fixed:
            raise ValueError(f"the reporter sets {sorted(fixed)} itself")
        if "last_round_reason" in changes:
            changes["last_round_reason"] = short_text(changes["last_round_reason"])
        with self._lock:
            if "release" in changes:
                release = changes["release"]
                if isinstance(release, Mapping) and "reason" in release:
                    release = {**release, "reason": short_text(release["reason"])}
                changes["release"] = release_changes(self._current.release, release)
            self._current = replace(self._current, **changes)
            current = self._current
        hook = self._on_change
        if hook is not None:
            hook()
        return current

    def update_release(self, **changes: Any) -> DeviceStatus:
        """Shorthand for ``update(release={...})``: change some fields of the release sub-record."""
        return self.update(release=changes)

    @property
    def release(self) -> ReleaseStatus:
        """The release sub-record as it stands."""
        return self.current.release

    def online_payload(self) -> bytes:
        """A freshly signed status saying the device is online (published on connect and on change)."""
        return self._sign(online=True)

    def offline_payload(self) -> bytes:
        """A freshly signed status saying the device is offline (the last will; a clean close)."""
        return self._sign(online=False)

    def _sign(self, *, online: bool) -> bytes:
        with self._lock:
            status = replace(self._current, sequence=self._signed, timestamp_ms=int(self._wall_clock() * 1000),
                             online=online, uptime_s=max(0, int(self._clock() - self._started)),
                             free_memory_bytes=self._free_memory())
            self._signed += 1
            self._current = status
        return sign_status(status, signer_key=self._key)
