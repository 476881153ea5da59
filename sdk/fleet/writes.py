"""File writes for fleet directories: atomic, with the right mode from the start, ownership kept on replace.

Every file is written to a temporary name in its directory, flushed, given
its mode (0600 for secrets) and renamed over the target, so a crash leaves
the old file or the new one. A replaced file keeps its owner and group: a
broker's password file that Mosquitto reads as user ``mosquitto`` stays
readable by it after a day-2 change.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


def make_dir(path: Path, *, secret: bool = False) -> Path:
    """Create ``path`` (and missing parents) with mode 0700 for secrets, 0755 otherwise; ``path``."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700 if secret else 0o755)
    return path


def write_file(path: Path, data: bytes | str, *, secret: bool) -> Path:
    """Atomically write ``data`` to ``path`` (0600 when ``secret``); an existing file keeps its owner; ``path``."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = None
    if path.exists():
        stat = path.stat()
        owner = (stat.st_uid, stat.st_gid)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, SECRET_MODE if secret else PUBLIC_MODE)
        if owner is not None and hasattr(os, "chown") and os.geteuid() == 0:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def link_or_copy(source: Path, target: Path) -> Path:
    """``target`` as a hard link to ``source`` (read-only content shared on one file system), else a copy; ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return target
