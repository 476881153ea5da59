"""One member's SQLite connection to an aggregator's store file: the I/O mechanics under :mod:`sdk.aggregator.store`.

- **The member lock**: an exclusive ``flock`` on ``<path>.<member>.lock``, held for the store's lifetime and
  released by the kernel when the process dies (even by SIGKILL), so one member name runs in one process.
- **WAL with** ``synchronous=FULL``: a commit returns only after its WAL frames are on disk.
- **The write lock by polling**: ``BEGIN IMMEDIATE`` retried every millisecond while another member holds it,
  up to the busy timeout. SQLite's own busy handler backs off to 100 ms sleeps, which idles a member far longer
  than the other holds the lock (one batch's SQL and fsync, a few ms).
"""

from __future__ import annotations

import fcntl
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

from sdk.aggregator.errors import StoreError

_SQLITE_BUSY = 5
_POLL_S = 0.001


def open_member_connection(path: Path, *, member: str, busy_timeout_s: float) -> tuple[sqlite3.Connection, IO[bytes]]:
    """The member's lock file (locked) and a WAL, ``synchronous=FULL`` connection to ``path`` (created if needed).

    StoreError when ``member`` is already open in a live process or the file cannot use WAL.
    """
    lock = open(f"{path}.{member}.lock", "ab")  # noqa: SIM115 - held for the store's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StoreError(f"member {member!r} of {path} is already open in a live process") from None
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_s)
        mode = _switch_to_wal(conn, busy_timeout_s)
        if mode != "wal":
            conn.close()
            raise StoreError(f"{path}: cannot switch to WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
    except BaseException:
        lock.close()
        raise
    return conn, lock


def begin_immediate(conn: sqlite3.Connection, busy_timeout_s: float) -> float:
    """``BEGIN IMMEDIATE``, retried every millisecond while another connection holds the write lock (up to the busy
    timeout, then the busy error); the seconds it waited."""
    started = time.monotonic()
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        _while_busy(lambda: conn.execute("BEGIN IMMEDIATE"), deadline=started + busy_timeout_s)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    return time.monotonic() - started


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """True for SQLITE_BUSY (another connection holds the lock), false for every other failure."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    return (code & 0xFF) == _SQLITE_BUSY if isinstance(code, int) else "database is locked" in str(exc)


def _switch_to_wal(conn: sqlite3.Connection, busy_timeout_s: float) -> str:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds a lock, up to the busy timeout: two
    members opening a new store at once both switch it, and SQLite answers the second "database is locked" at
    once, without its busy handler (waiting could deadlock it). The journal mode it ends in."""
    row = _while_busy(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone(), deadline=time.monotonic() + busy_timeout_s)
    return str(row[0])


_T = TypeVar("_T")


def _while_busy(statement: Callable[[], _T], *, deadline: float) -> _T:
    """``statement()``, run again every millisecond while it fails with SQLITE_BUSY, until ``deadline`` (monotonic
    seconds; then the busy error). Any other failure is raised at once."""
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(_POLL_S)
