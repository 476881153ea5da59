"""Crash-safe persistence of device training state in numbered generations.

A save writes a complete new generation directory (files + ``meta.json``
listing their SHA-256), fsyncs it, renames it into place and only then points
``CURRENT`` at it (write-temp, fsync, rename). A process killed at any instant
therefore leaves ``CURRENT`` naming a complete generation, and a load that
finds a damaged generation falls back to the newest intact one.
:class:`ResidualFile` keeps the compression's error-feedback residual.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.compression.feedback import ResidualState
from device_agent.errors import FedgeError, StateError
from device_agent.protocol.tensor_codec import decode_tensors, encode_tensors

logger = logging.getLogger(__name__)

_GEN = re.compile(r"^gen-(\d{9})$")
_KEEP = 2


@dataclass(frozen=True, kw_only=True)
class StoredState:
    """A complete, hash-checked generation: its directory and metadata."""

    directory: Path
    generation: int
    meta: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class StateStore:
    """Generations of device state under one directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _generations(self) -> list[int]:
        gens = []
        for p in self.directory.iterdir():
            m = _GEN.match(p.name)
            if m and p.is_dir():
                gens.append(int(m.group(1)))
        return sorted(gens)

    def save(self, write_files: Callable[[Path], None], meta: dict[str, Any]) -> StoredState:
        """Write a new generation: ``write_files(dir)`` fills it, then it is sealed and made current."""
        gens = self._generations()
        number = (gens[-1] + 1) if gens else 1
        final = self.directory / f"gen-{number:09d}"
        staging = self.directory / f".staging-{number:09d}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            write_files(staging)
            hashes = {}
            for f in sorted(staging.iterdir()):
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                hashes[f.name] = _sha256(f)
            full_meta = {**meta, "files": hashes, "generation": number}
            with open(staging / "meta.json", "w") as fh:
                json.dump(full_meta, fh, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(staging)
            os.replace(staging, final)
            _fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        atomic_write_bytes(self.directory / "CURRENT", final.name.encode())
        for old in self._generations()[:-_KEEP]:
            shutil.rmtree(self.directory / f"gen-{old:09d}", ignore_errors=True)
        for p in self.directory.glob(".staging-*"):
            shutil.rmtree(p, ignore_errors=True)
        return StoredState(directory=final, generation=number, meta=full_meta)

    def _check(self, number: int) -> StoredState:
        d = self.directory / f"gen-{number:09d}"
        try:
            meta = json.loads((d / "meta.json").read_text())
            files = meta["files"]
            present = {p.name for p in d.iterdir()} - {"meta.json"}
            if set(files) != present:
                raise StateError(f"generation {number}: files {sorted(present)} do not match meta {sorted(files)}")
            for name, digest in files.items():
                if _sha256(d / name) != digest:
                    raise StateError(f"generation {number}: {name} is corrupt")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(f"generation {number} is unreadable: {exc}") from exc
        return StoredState(directory=d, generation=number, meta=meta)

    def load(self) -> StoredState | None:
        """The newest intact generation (CURRENT first), or None when nothing was ever saved."""
        candidates = self._generations()[::-1]
        try:
            current = (self.directory / "CURRENT").read_text().strip()
            m = _GEN.match(current)
            if m:
                n = int(m.group(1))
                candidates = [n] + [c for c in candidates if c != n]
        except OSError:
            pass
        for number in candidates:
            try:
                return self._check(number)
            except StateError as exc:
                logger.warning("skipping damaged state: %s", exc)
        return None


class ResidualFile:
    """The error-feedback residual (:class:`~device_agent.compression.ResidualState`) in one file, replaced atomically.

    Stored with the tensor codec (raw float64, never pickle): ``@bundle`` and
    ``@round`` as int64 scalars, then ``before/<name>`` and ``after/<name>``.
    It is named arrays only, so it does not depend on the training backend.
    A damaged or foreign file is logged and treated as no residual (the
    device loses some delayed update, never its model).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def save(self, state: ResidualState) -> None:
        """Replace the file with ``state``."""
        tensors = {"@bundle": np.array([state.bundle_version], np.int64), "@round": np.array([state.round], np.int64)}
        tensors.update({f"before/{n}": np.asarray(v, np.float64) for n, v in state.before.items()})
        tensors.update({f"after/{n}": np.asarray(v, np.float64) for n, v in state.after.items()})
        atomic_write_bytes(self.path, encode_tensors(tensors))

    def load(self) -> ResidualState | None:
        """The saved state, or None when there is none or it is unreadable."""
        try:
            tensors = decode_tensors(self.path.read_bytes(), encoding="raw")
            bundle, rnd = tensors.pop("@bundle"), tensors.pop("@round")
            parts: dict[str, dict[str, np.ndarray]] = {"before": {}, "after": {}}
            for key, value in tensors.items():
                part, _, name = key.partition("/")
                if part not in parts or not name or value.dtype != np.float64:
                    raise ValueError(f"unexpected entry {key!r}")
                parts[part][name] = value
            return ResidualState(bundle_version=int(bundle[0]), round=int(rnd[0]), before=parts["before"], after=parts["after"])
        except FileNotFoundError:
            return None
        except (OSError, KeyError, IndexError, ValueError, FedgeError) as exc:
            logger.warning("ignoring the compression residual in %s: %s", self.path, exc)
            return None
