"""Builds the xdist workers of one test run share: the first worker to ask builds, the others wait and reuse.

Lives in the run's shared temp directory (``run_shared_dir`` in tests/conftest.py),
so nothing outlives the run; the machine-wide cache of slow set-ups is
:mod:`tests.build_cache`.
"""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Callable
from pathlib import Path


def name_of(key: tuple[object, ...]) -> str:
    """A short file-name-safe hash of ``key`` (a tuple of str/int/float/tuples, compared by repr)."""
    return hashlib.sha256(repr(key).encode()).hexdigest()[:20]


def build_once(directory: Path, key: tuple[object, ...], build: Callable[[Path], None], *, suffix: str = ".fedge") -> Path:
    """``directory/<hash of key><suffix>``, made by ``build(path)`` by the first worker that asks (the others wait)."""
    path = directory / f"{name_of(key)}{suffix}"
    with open(directory / f"{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            partial = directory / f"partial-{path.name}"
            partial.unlink(missing_ok=True)
            build(partial)
            partial.rename(path)
    return path
