"""The release metadata files a broker delivered (retained ``release/metadata/<file>``), as TUF will ask for them.

One place decides what is kept: names of the repository's consistent
snapshot (``N.root.json``, ``N.targets.json``, ``N.rollout.json``,
``N.snapshot.json``, ``timestamp.json``), each within python-tuf's size limit
for its role, at most :data:`MAX_FILES` files; an empty retained message
clears a file. Nothing here trusts the bytes: :func:`~device_agent.release.tuf_view.refresh_view`
verifies them. The device's release client and the dashboard both use it.
"""

from __future__ import annotations

import logging
import re

from device_agent.release.tuf_view import UPDATER_CONFIG

logger = logging.getLogger(__name__)

METADATA_NAME = re.compile(r"(?:[1-9][0-9]{0,8}\.(?:root|targets|rollout|snapshot)|timestamp)\.json")
MAX_FILES = 512


class MetadataCache:
    """Retained metadata files by name (module docstring); :meth:`get` is a ``BrokerFetcher`` metadata source."""

    def __init__(self) -> None:
        self._files: dict[str, bytes] = {}

    def file(self, name: str, payload: bytes) -> bool:
        """Keep (or, when empty, clear) file ``name``; False when refused (a bad name, too large, cache full; logged)."""
        if not METADATA_NAME.fullmatch(name):
            logger.warning("ignoring release metadata with an unexpected name %r", name)
            return False
        limit = UPDATER_CONFIG.timestamp_max_length if name == "timestamp.json" else UPDATER_CONFIG.targets_max_length
        if not payload:
            self._files.pop(name, None)  # a cleared retained message
        elif len(payload) > limit:
            logger.warning("ignoring release metadata %s of %d bytes (limit %d)", name, len(payload), limit)
            return False
        elif name in self._files or len(self._files) < MAX_FILES:
            self._files[name] = bytes(payload)
        return True

    def get(self, name: str) -> bytes | None:
        """The bytes of file ``name``, None when the broker holds none."""
        return self._files.get(name)

    def __len__(self) -> int:
        return len(self._files)
