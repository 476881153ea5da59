"""Chunks of a release's bundle on the device's disk, so a download survives a disconnect or a reboot.

Layout under ``<state dir>/release/downloads/``::

    <sha256>/plan.json       release, length, chunk size and every chunk's SHA-256 (from signed metadata)
    <sha256>/<index>.chunk   one chunk, written atomically once its SHA-256 matched the plan

A chunk is kept only when its hash is the one the signed release metadata
names, so a tampered chunk is refused on arrival (counted, never written)
and the same chunk can be fetched again. Only the whole, TUF-verified file is
ever unpacked (:mod:`device_agent.release.client`). At most
``max_downloads`` bundles are kept; the oldest others are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from device_agent.release.release_info import ReleaseInfo
from device_agent.state_store import atomic_write_bytes

logger = logging.getLogger(__name__)

_PLAN = "plan.json"


@dataclass(frozen=True, kw_only=True)
class ChunkResult:
    """What :meth:`Download.add` did with one chunk: ``stored``, or why not (``duplicate``, ``hash_mismatch``, ``out_of_range``)."""

    stored: bool
    reason: str = ""


class Download:
    """One bundle's chunks (see the module docstring); build it with :meth:`DownloadStore.begin`."""

    def __init__(self, directory: Path, info: ReleaseInfo) -> None:
        self.directory = directory
        self.info = info
        self._have = {int(p.stem) for p in directory.glob("*.chunk") if p.stem.isdigit() and int(p.stem) < info.chunks
                      and self._intact(int(p.stem), p)}

    def _intact(self, index: int, path: Path) -> bool:
        try:
            data = path.read_bytes()
        except OSError:
            return False
        if hashlib.sha256(data).hexdigest() == self.info.chunk_sha256[index]:
            return True
        logger.warning("dropping damaged chunk %d of release %d in %s", index, self.info.release, self.directory)
        path.unlink(missing_ok=True)
        return False

    @property
    def received(self) -> int:
        """Chunks on disk."""
        return len(self._have)

    @property
    def complete(self) -> bool:
        """True once every chunk is on disk."""
        return len(self._have) == self.info.chunks

    @property
    def progress_pct(self) -> int:
        """Bytes on disk as a percentage of the bundle (0..100)."""
        if not self.info.length:
            return 100
        done = sum(self.info.chunk_length(i) for i in self._have)
        return min(100, done * 100 // self.info.length)

    def missing(self) -> list[int]:
        """Chunk indexes not on disk yet, in order."""
        return [i for i in range(self.info.chunks) if i not in self._have]

    def add(self, index: int, data: bytes) -> ChunkResult:
        """Keep chunk ``index`` if its SHA-256 is the signed one (atomic write); otherwise say why not."""
        if not 0 <= index < self.info.chunks:
            return ChunkResult(stored=False, reason="out_of_range")
        if index in self._have:
            return ChunkResult(stored=False, reason="duplicate")
        if len(data) != self.info.chunk_length(index) or hashlib.sha256(data).hexdigest() != self.info.chunk_sha256[index]:
            return ChunkResult(stored=False, reason="hash_mismatch")
        atomic_write_bytes(self.directory / f"{index}.chunk", data)
        self._have.add(index)
        return ChunkResult(stored=True)

    def read_all(self) -> bytes:
        """The whole bundle's bytes (complete downloads only)."""
        if not self.complete:
            raise ValueError(f"release {self.info.release}: {len(self.missing())} chunk(s) still missing")
        return b"".join((self.directory / f"{i}.chunk").read_bytes() for i in range(self.info.chunks))


class DownloadStore:
    """The downloads directory of one device (module docstring)."""

    def __init__(self, directory: str | Path, *, max_downloads: int = 2) -> None:
        if max_downloads < 1:
            raise ValueError("max_downloads must be >= 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._max = max_downloads

    def begin(self, info: ReleaseInfo) -> Download:
        """The download of ``info``'s bundle: resumed from disk when its plan matches, else started afresh."""
        directory = self.directory / info.sha256
        plan = json.dumps({"release": info.release, "length": info.length, "chunk_size": info.chunk_size,
                           "chunk_sha256": list(info.chunk_sha256)}, sort_keys=True).encode()
        plan_file = directory / _PLAN
        try:
            same = plan_file.read_bytes() == plan
        except OSError:
            same = False
        if not same:
            # A new download, or the same bundle cut differently (other chunk size): start over.
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            atomic_write_bytes(plan_file, plan)
            self._prune(keep=info.sha256)
        return Download(directory, info)

    def discard(self, sha256: str) -> None:
        """Forget one bundle's chunks (after installing it, or when it was refused)."""
        shutil.rmtree(self.directory / sha256, ignore_errors=True)

    def _prune(self, *, keep: str) -> None:
        others = sorted((p for p in self.directory.iterdir() if p.is_dir() and p.name != keep),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for old in others[self._max - 1:]:
            logger.info("removing the old partial download %s", old.name)
            shutil.rmtree(old, ignore_errors=True)
