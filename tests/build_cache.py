"""Slow things tests build once per machine (device venvs, an emulated Debian root, aarch64 wheels), kept outside the checkout.

Everything lives under ``$FEDGE_TEST_CACHE`` (default ``$XDG_CACHE_HOME/fedge-tests``,
else ``~/.cache/fedge-tests``), one directory per *name + key*, where the key
hashes everything that goes into the build: change an input and a new entry is
built beside the old one. An entry counts only once its ``.complete`` stamp
exists, so a build killed half-way is redone. Several test sessions (other
checkouts on the same machine) can share the cache: a per-entry ``fcntl`` lock
serialises building and, for entries a session modifies, using.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

STAMP = ".complete"
REPO = Path(__file__).resolve().parents[1]


class CacheLockTimeout(RuntimeError):
    """Another session held a cache entry's lock for longer than the caller would wait."""


def cache_root() -> Path:
    """The machine-wide test cache directory (created)."""
    if os.environ.get("FEDGE_TEST_CACHE"):
        root = Path(os.environ["FEDGE_TEST_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedge-tests"
    root.mkdir(parents=True, exist_ok=True)
    return root


def key_of(*parts: object) -> str:
    """A short stable hash of ``parts`` (JSON-able values; Paths are hashed by their bytes)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            digest.update(part.read_bytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def tree_key(root: Path, names: tuple[str, ...]) -> str:
    """A short hash of the files under ``root/<name>`` for each name (paths and bytes; caches skipped)."""
    digest = hashlib.sha256()
    for name in names:
        top = root / name
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for path in files:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@contextmanager
def cache_lock(entry: str, *, timeout_s: float, shared: bool = False) -> Iterator[None]:
    """Hold the lock of cache entry ``entry`` (exclusive to build, ``shared`` to use); CacheLockTimeout after ``timeout_s``."""
    path = cache_root() / f"{entry}.lock"
    with open(path, "a") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CacheLockTimeout(f"{path} was held by another test session for more than {timeout_s:g} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_built(entry: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The directory of ``entry``, built by ``build(directory)`` unless complete; (path, True when built now).

    The caller holds :func:`cache_lock` for ``entry``. ``build`` gets an empty
    directory at the final path (venvs and chroots are not relocatable).
    """
    path = cache_root() / entry
    if (path / STAMP).exists():
        return path, False
    if path.exists():
        unmount_under(path)  # a killed debootstrap leaves /proc mounted in its target
        shutil.rmtree(path)
    path.mkdir(parents=True)
    build(path)
    (path / STAMP).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return path, True


@contextmanager
def held_entry(kind: str, entry: str, build: Callable[[Path], None], *, keep: int,
               timeout_s: float) -> Iterator[tuple[Path, bool]]:
    """Entry ``entry`` of ``kind``, built if missing, held in use (shared lock) until the context ends; (path, built now).

    Users of a complete entry hold the shared lock for a whole module or session: only a missing
    entry takes the exclusive one, or a second xdist worker would wait for every user to finish.
    Older entries of ``kind`` beyond ``keep`` are pruned.
    """
    path, built = cache_root() / entry, False
    if not (path / STAMP).exists():
        with cache_lock(entry, timeout_s=timeout_s):
            path, built = ensure_built(entry, build)
    prune(kind, keep=keep)
    with cache_lock(entry, timeout_s=timeout_s, shared=True):
        yield path, built


def unmount_under(path: Path) -> None:
    """Unmount (lazily, deepest first) every mount point at or below ``path``; RuntimeError if one stays."""
    prefix = str(path.resolve())
    def mounted() -> list[str]:
        points = [line.split()[1].replace("\\040", " ") for line in Path("/proc/mounts").read_text().splitlines()]
        return sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), key=len, reverse=True)
    for point in mounted():
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=60, check=False)
    if mounted():
        raise RuntimeError(f"could not unmount {mounted()}; remove {path} by hand")


def prune(kind: str, *, keep: int) -> list[Path]:
    """Remove all but the ``keep`` newest complete entries named ``<kind>-<key>``, skipping any in use; those removed."""
    root = cache_root()
    entries = sorted((p for p in root.glob(f"{kind}-*") if p.is_dir() and (p / STAMP).exists()),
                     key=lambda p: (p / STAMP).stat().st_mtime, reverse=True)
    removed = []
    for path in entries[keep:]:
        with open(root / f"{path.name}.lock", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another session is using it
            unmount_under(path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
