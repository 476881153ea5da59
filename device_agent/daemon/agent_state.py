"""The agent's durable state between restarts: progress, the pending sealed update, the trainer.

Layout of the state directory::

    progress.json          bundle version, last round done, highest model round seen (rollback floor), last receipt
    pending-update.bin     the exact bytes of a sealed update not yet answered by a receipt
    pending-update.json    its header and SHA-256: the commit record, written after the .bin
    trainer/               DeviceTrainer generations (personal weights, optimizer, global reference)
    residual.bin           compressing bundles only: the error-feedback residual (``device_agent.state_store.ResidualFile``)

Every file is replaced atomically (write temp, fsync, rename). The pending
update is committed by its ``.json``, written after the ``.bin`` and naming
its SHA-256, so a crash between the two leaves no pending update rather than
a wrong one; clearing removes the ``.json`` first for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.errors import FedgeError, StateError
from device_agent.protocol.headers import UpdateHeader
from device_agent.state_store import atomic_write_bytes

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_PROGRESS = "progress.json"
_PENDING_BLOB = "pending-update.bin"
_PENDING_META = "pending-update.json"


@dataclass(frozen=True, kw_only=True)
class SealedUpdate:
    """A sealed update ready to publish: the exact bytes, and their header to match the receipt."""

    header: UpdateHeader
    blob: bytes


@dataclass(frozen=True, kw_only=True)
class AgentProgress:
    """Where the device is in the federation.

    ``bundle_version``: the bundle these rounds belong to (-1: none yet); round
    numbers mean nothing across bundles, so a new bundle starts progress afresh.
    ``completed_round``: the last round the device is done with (a receipt
    came, or the update was refused locally); -1 before the first.
    ``highest_model_round``: the newest model round accepted; older models are
    rollbacks and ignored; -1 before the first. ``last_receipt``: the signed
    bytes of the last receipt, None before the first.
    """

    bundle_version: int = -1
    completed_round: int = -1
    highest_model_round: int = -1
    last_receipt: bytes | None = None


class AgentStateFiles:
    """Reads and writes the files above under ``directory`` (created when missing)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def trainer_dir(self) -> Path:
        """Where the DeviceTrainer keeps its generations."""
        return self.directory / "trainer"

    def load_progress(self) -> AgentProgress:
        """The saved progress; the initial one when nothing was saved. StateError if the file is damaged."""
        path = self.directory / _PROGRESS
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return AgentProgress()
        except (OSError, ValueError) as exc:
            raise StateError(f"{path} is unreadable: {exc}") from exc
        try:
            if data["version"] != STATE_VERSION:
                raise ValueError(f"unsupported version {data['version']!r}")
            receipt = data["last_receipt"]
            return AgentProgress(
                bundle_version=_round(data["bundle_version"]),
                completed_round=_round(data["completed_round"]),
                highest_model_round=_round(data["highest_model_round"]),
                last_receipt=bytes.fromhex(receipt) if receipt is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{path} is not agent progress: {exc!r}; remove it to start over") from exc

    def save_progress(self, progress: AgentProgress) -> None:
        """Replace the progress file atomically."""
        data = {
            "version": STATE_VERSION,
            "bundle_version": progress.bundle_version,
            "completed_round": progress.completed_round,
            "highest_model_round": progress.highest_model_round,
            "last_receipt": progress.last_receipt.hex() if progress.last_receipt is not None else None,
        }
        atomic_write_bytes(self.directory / _PROGRESS, json.dumps(data, sort_keys=True).encode())

    def save_pending(self, sealed: SealedUpdate) -> None:
        """Make ``sealed`` the pending update: bytes first, then the commit record."""
        atomic_write_bytes(self.directory / _PENDING_BLOB, sealed.blob)
        meta = {
            "version": STATE_VERSION,
            "header": sealed.header.to_bytes().decode("ascii"),
            "sha256": hashlib.sha256(sealed.blob).hexdigest(),
        }
        atomic_write_bytes(self.directory / _PENDING_META, json.dumps(meta, sort_keys=True).encode())

    def load_pending(self) -> SealedUpdate | None:
        """The committed pending update, or None (nothing pending, or a damaged one, which is logged and dropped)."""
        meta_path = self.directory / _PENDING_META
        try:
            meta: Any = json.loads(meta_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._discard(f"unreadable commit record: {exc}")
            return None
        try:
            if meta["version"] != STATE_VERSION:
                raise ValueError(f"unsupported version {meta['version']!r}")
            header = UpdateHeader.from_bytes(str(meta["header"]).encode("ascii"))
            blob = (self.directory / _PENDING_BLOB).read_bytes()
            if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
                raise ValueError("the update bytes do not match their commit record")
        except (OSError, KeyError, TypeError, ValueError, UnicodeError, FedgeError) as exc:
            self._discard(str(exc))
            return None
        return SealedUpdate(header=header, blob=blob)

    def pending_for(self, *, round: int, bundle_version: int, sender: str, fleet: str) -> SealedUpdate | None:
        """The pending update if it is ``sender``'s for ``round`` of this bundle and fleet; another is dropped."""
        pending = self.load_pending()
        if pending is None:
            return None
        h = pending.header
        if (h.round, h.bundle_version, h.sender, h.fleet) == (round, bundle_version, sender, fleet):
            return pending
        logger.info("dropping the pending update of round %d (now at round %d)", h.round, round)
        self.clear_pending()
        return None

    def clear_pending(self) -> None:
        """Forget the pending update (commit record first)."""
        for name in (_PENDING_META, _PENDING_BLOB):
            try:
                (self.directory / name).unlink()
            except FileNotFoundError:
                pass

    def _discard(self, why: str) -> None:
        logger.warning("dropping the pending update in %s: %s", self.directory, why)
        self.clear_pending()


def _round(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
        raise ValueError(f"expected an integer >= -1, got {value!r}")
    return value
