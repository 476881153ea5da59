"""Durable aggregator state in SQLite: the edge module where all the SQL lives.

One SQLite file per aggregator (a region or the root), in WAL mode with
``synchronous=FULL``: a commit returns only after its WAL frames are on disk,
so a committed acceptance survives a power cut, not just a process crash.
Several processes of one aggregator on one host may share the file; each is
a *member* with its own partial sum (see docs/aggregation.md).

Tables::

    meta            schema version and the identity of the aggregator owning the file
    round_state     the current round: number, status, the global model, the model the
                    round's deltas are relative to, the signed model published for it,
                    and, once closed, its result (mean delta, counts, sealed aggregate)
    partial_sums    per (member, round): count, total weight, samples and the float64
                    running sums (empty for the buffered rules)
    accepted        per accepted update: (sender, round, nonce) UNIQUE, (sender, round)
                    UNIQUE (one contribution per sender and round), a content digest,
                    the weight, and the delta itself for the buffered rules only
    replay_snapshot the replay window as of the last round start, and the last
                    ``accepted.seq`` it includes (later rows are replayed into it)
    counters        rejections by reason, duplicates, abandoned updates

Arrays travel through :mod:`device_agent.protocol.tensor_codec` (float64 sums
stay float64, so a resumed sum is bit-for-bit the one written), never pickle.
Every write method must run inside :meth:`AggregatorStore.transaction`
(``BEGIN IMMEDIATE``), so that accepting a batch of updates, i.e. inserting
their ``accepted`` rows and writing the new partial sum, is one atomic commit
(:meth:`AggregatorStore.savepoint` scopes one update's writes inside it). The
connection itself (member lock, WAL, the polled write lock) is
:mod:`sdk.aggregator.store_connection`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from device_agent.protocol.headers import check_id
from device_agent.protocol.tensor_codec import DecodeLimits, decode_tensors, encode_tensors
from sdk.aggregation import WeightedMeanState
from sdk.aggregation.influence import RoundBounds
from sdk.aggregator.errors import RoundStateError, StoreError
from sdk.aggregator.records import (
    Acceptance,
    AcceptedKey,
    ClosedRound,
    ForwardOutcome,
    PartialSum,
    ReplaySnapshot,
    RoundMarker,
    RoundRecord,
)
from sdk.aggregator.round_state import RoundStatus
from sdk.aggregator.store_connection import begin_immediate, open_member_connection
from sdk.aggregator.store_schema import SCHEMA_VERSION, create_or_migrate

logger = logging.getLogger(__name__)

# The file is our own, written by this module: the limits only guard against a corrupt file.
_OWN_LIMITS = DecodeLimits(max_tensors=1 << 16, max_total_bytes=1 << 40, max_rank=32, max_name_bytes=4096)


class AcceptanceConflict(StoreError):
    """The (sender, round) was accepted meanwhile (by another member): look it up again."""


def pack_params(params: Mapping[str, np.ndarray]) -> bytes:
    """Arrays as tensor-codec bytes (exact: float64 stays float64)."""
    return encode_tensors(params)


def unpack_params(blob: bytes) -> dict[str, np.ndarray]:
    """Arrays written by :func:`pack_params`."""
    return decode_tensors(blob, limits=_OWN_LIMITS)


class AggregatorStore:
    """The SQLite file of one aggregator, opened by one member process.

    Reads may run anywhere; writes only inside :meth:`transaction`. Not
    thread-safe (one connection); share the file across processes instead.
    """

    def __init__(self, conn: sqlite3.Connection, *, member: str, lock: IO[bytes], path: Path, busy_timeout_s: float = 30.0) -> None:
        self._conn = conn
        self._busy_timeout_s = busy_timeout_s
        self._member = member
        self._lock = lock
        self._path = path
        self._in_transaction = False
        #: Called with the seconds each COMMIT took (None: nobody is timing commits).
        self.commit_observer: Callable[[float], None] | None = None
        #: Called with the seconds each BEGIN IMMEDIATE waited for another member's write lock (None: not timed).
        self.lock_wait_observer: Callable[[float], None] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, identity: str, member: str = "main", busy_timeout_s: float = 30.0) -> AggregatorStore:
        """Open (creating if needed) the store at ``path`` for the aggregator ``identity`` as ``member``.

        StoreError if the file belongs to another identity, has another schema
        version, or ``member`` is already open in a live process (an exclusive
        ``flock`` on ``<path>.<member>.lock``, released by the kernel when the
        process dies, even by SIGKILL).
        """
        check_id("member", member)
        path = Path(path)
        conn, lock = open_member_connection(path, member=member, busy_timeout_s=busy_timeout_s)
        try:
            store = cls(conn, member=member, lock=lock, path=path, busy_timeout_s=busy_timeout_s)
            store._init_schema(identity)
        except BaseException:
            conn.close()
            lock.close()
            raise
        return store

    def _init_schema(self, identity: str) -> None:
        with self.transaction():
            stored = None
            if self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
                row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                stored = None if row is None else str(row[0])
            create_or_migrate(self._conn, stored)
            for key, value in (("schema_version", str(SCHEMA_VERSION)), ("identity", identity)):
                self._conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        if meta["schema_version"] != str(SCHEMA_VERSION):
            self.close()
            raise StoreError(f"{self._path}: schema version {meta['schema_version']}, this code reads {SCHEMA_VERSION}")
        if meta["identity"] != identity:
            self.close()
            raise StoreError(f"{self._path} belongs to {meta['identity']!r}, not {identity!r}")

    @property
    def member(self) -> str:
        """This process's member name (its partial sum row)."""
        return self._member

    def close(self) -> None:
        """Close the connection and release the member lock; idempotent."""
        self._conn.close()
        if not self._lock.closed:
            self._lock.close()

    def pragma(self, name: str) -> Any:
        """The value of a read-only pragma (``journal_mode``, ``synchronous``), for checks and tests."""
        if name not in ("journal_mode", "synchronous"):
            raise ValueError(f"unsupported pragma {name!r}")
        return self._conn.execute(f"PRAGMA {name}").fetchone()[0]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception rolls everything back. Does not nest."""
        if self._in_transaction:
            raise RuntimeError("store transactions do not nest")
        self._begin()
        self._in_transaction = True
        try:
            yield
            started = time.perf_counter()
            self._conn.execute("COMMIT")
            if self.commit_observer is not None:
                self.commit_observer(time.perf_counter() - started)
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        finally:
            self._in_transaction = False

    def _begin(self) -> None:
        waited = begin_immediate(self._conn, self._busy_timeout_s)
        if self.lock_wait_observer is not None:
            self.lock_wait_observer(waited)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside :meth:`transaction`: a nested scope whose writes are undone alone when it raises (one update of a batch)."""
        self._write("SAVEPOINT item")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK TO item")
            self._conn.execute("RELEASE item")
            raise
        self._conn.execute("RELEASE item")

    def _write(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        if not self._in_transaction:
            raise RuntimeError("store writes must run inside transaction()")
        return self._conn.execute(sql, args)

    # -- reads ---------------------------------------------------------------

    def round_marker(self) -> RoundMarker | None:
        """The current round and its status; None before the first round."""
        row = self._conn.execute("SELECT round, status FROM round_state WHERE id = 1").fetchone()
        return None if row is None else RoundMarker(round=row[0], status=RoundStatus(row[1]))

    def load_round(self) -> RoundRecord | None:
        """The current round with its models; None before the first round."""
        row = self._conn.execute(
            "SELECT round, status, global_params, base_params, model_blob, closed_mean, closed_updates,"
            " closed_samples, closed_params, closed_blob, closed_nonce, clip_norm, weight_cap,"
            " forward_status, forward_receipt FROM round_state WHERE id = 1"
        ).fetchone()
        if row is None:
            return None
        closing = None
        if row[1] == RoundStatus.CLOSED.value:
            closing = ClosedRound(
                mean_delta=None if row[5] is None else unpack_params(row[5]),
                update_count=row[6],
                sample_count=row[7],
                result_params=None if row[8] is None else unpack_params(row[8]),
                result_blob=row[9],
                result_nonce=row[10],
            )
        return RoundRecord(
            round=row[0],
            status=RoundStatus(row[1]),
            global_params=unpack_params(row[2]),
            base_params=unpack_params(row[3]),
            model_blob=row[4],
            closing=closing,
            bounds=None if row[12] is None else RoundBounds(clip_norm=row[11], weight_cap=int(row[12])),
            forward=None if row[13] is None else ForwardOutcome(status=row[13], receipt=row[14]),
        )

    def unanswered_aggregate(self) -> bytes | None:
        """The closed current round's sealed aggregate while no answer from the tier above is stored; else None."""
        row = self._conn.execute(
            "SELECT closed_blob FROM round_state WHERE id = 1 AND status = 'closed' AND forward_status IS NULL").fetchone()
        return None if row is None else row[0]

    def load_partial(self, round: int) -> PartialSum | None:
        """This member's partial sum for ``round``; None if it accepted nothing yet."""
        row = self._conn.execute(
            "SELECT count, total_weight, samples, sums FROM partial_sums WHERE member = ? AND round = ?", (self._member, round)
        ).fetchone()
        return None if row is None else _partial(row)

    def partials(self, round: int) -> list[PartialSum]:
        """Every member's partial sum for ``round``, in member-name order (a fixed merge order)."""
        rows = self._conn.execute(
            "SELECT count, total_weight, samples, sums FROM partial_sums WHERE round = ? ORDER BY member", (round,)
        ).fetchall()
        return [_partial(row) for row in rows]

    def round_totals(self, round: int) -> tuple[int, int]:
        """(accepted updates, samples) of ``round`` over all members."""
        row = self._conn.execute(
            "SELECT COALESCE(SUM(count), 0), COALESCE(SUM(samples), 0) FROM partial_sums WHERE round = ?", (round,)
        ).fetchone()
        return int(row[0]), int(row[1])

    def find_acceptance(self, sender: str, round: int) -> Acceptance | None:
        """The update accepted from ``sender`` for ``round``, if any."""
        row = self._conn.execute(
            "SELECT nonce, digest, sample_count, weight, norm FROM accepted WHERE sender = ? AND round = ?", (sender, round)
        ).fetchone()
        if row is None:
            return None
        return Acceptance(sender=sender, round=round, nonce=row[0], digest=row[1], sample_count=row[2], weight=row[3],
                          norm=0.0 if row[4] is None else row[4])

    def find_acceptances(self, round: int, senders: Iterable[str]) -> dict[str, Acceptance]:
        """The updates accepted for ``round`` from any of ``senders`` (one query): sender -> its acceptance."""
        wanted = sorted(set(senders))
        found: dict[str, Acceptance] = {}
        for start in range(0, len(wanted), 500):  # well under SQLite's bound-parameter limit
            chunk = wanted[start:start + 500]
            rows = self._conn.execute(
                "SELECT sender, nonce, digest, sample_count, weight, norm FROM accepted WHERE round = ? AND sender IN"
                f" ({', '.join('?' * len(chunk))})", (round, *chunk))
            for sender, nonce, digest, sample_count, weight, norm in rows:
                found[sender] = Acceptance(sender=sender, round=round, nonce=nonce, digest=digest, sample_count=sample_count,
                                           weight=weight, norm=0.0 if norm is None else norm)
        return found

    def round_statistics(self, round: int) -> tuple[list[float], list[int]]:
        """(raw L2 norms, claimed sample counts) of every update accepted for ``round``, in commit order."""
        rows = self._conn.execute("SELECT norm, sample_count FROM accepted WHERE round = ? ORDER BY seq", (round,)).fetchall()
        return [float(r[0]) for r in rows if r[0] is not None], [int(r[1]) for r in rows]

    def contributions(self, round: int) -> list[tuple[str, int]]:
        """(sender, weight) of every update accepted for ``round``, sorted by sender."""
        rows = self._conn.execute("SELECT sender, weight FROM accepted WHERE round = ? ORDER BY sender", (round,))
        return [(sender, int(weight)) for sender, weight in rows]

    def counted_contributors(self, round: int) -> list[tuple[str, int]]:
        """(device, weight) of every device the children's aggregates counted in ``round``, sorted by device (a middle
        tier's own contributor list); StoreError when a row predates the weights (schema version 2)."""
        rows = self._conn.execute("SELECT device, weight FROM contributors WHERE round = ? ORDER BY device", (round,)).fetchall()
        if any(weight is None for _, weight in rows):
            raise StoreError(f"round {round}'s contributor rows carry no weights (written before schema version 3)")
        return [(device, int(weight)) for device, weight in rows]

    def counted_elsewhere(self, round: int, devices: list[str], region: str) -> dict[str, str]:
        """Of ``devices``, those another region already has counted in ``round``: device -> that region (root)."""
        found: dict[str, str] = {}
        for device in devices:
            row = self._conn.execute("SELECT region FROM contributors WHERE round = ? AND device = ?", (round, device)).fetchone()
            if row is not None and row[0] != region:
                found[device] = row[0]
        return found

    def accepted_since(self, seq: int) -> list[AcceptedKey]:
        """Accepted rows after ``seq``, in commit order."""
        rows = self._conn.execute("SELECT seq, sender, round, nonce FROM accepted WHERE seq > ? ORDER BY seq", (seq,))
        return [AcceptedKey(seq=r[0], sender=r[1], round=r[2], nonce=r[3]) for r in rows]

    def buffered_deltas(self, round: int) -> Iterator[tuple[dict[str, np.ndarray], float]]:
        """(delta, weight) of every update of ``round`` stored for a buffered rule, in commit order."""
        rows = self._conn.execute(
            "SELECT delta, weight FROM accepted WHERE round = ? AND delta IS NOT NULL ORDER BY seq", (round,)
        )
        for delta, weight in rows:
            yield unpack_params(delta), weight

    def replay_snapshot(self) -> ReplaySnapshot | None:
        """The replay window saved at the last round start; None before the first round."""
        row = self._conn.execute("SELECT state, seq FROM replay_snapshot WHERE id = 1").fetchone()
        return None if row is None else ReplaySnapshot(state=json.loads(row[0]), seq=row[1])

    def counters(self) -> dict[str, int]:
        """Every counter (``rejected:<reason>``, ``duplicate``, ...)."""
        return dict(self._conn.execute("SELECT name, count FROM counters ORDER BY name").fetchall())

    # -- writes (inside transaction()) ---------------------------------------

    def begin_round(
        self,
        *,
        round: int,
        global_params: Mapping[str, np.ndarray],
        base_params: Mapping[str, np.ndarray],
        model_blob: bytes,
        replay: ReplaySnapshot,
        keep_accepted_from: int,
        bounds: RoundBounds | None = None,
    ) -> None:
        """Make ``round`` the current, collecting round, with its influence ``bounds`` (None: none).

        Forgets older partial sums, buffered deltas and contributor records, and
        accepted rows below ``keep_accepted_from`` (the replay window's floor: the rows it may still need).
        """
        self._write(
            "INSERT OR REPLACE INTO round_state (id, round, status, global_params, base_params, model_blob, clip_norm,"
            " weight_cap) VALUES (1, ?, 'collecting', ?, ?, ?, ?, ?)",
            (round, pack_params(global_params), pack_params(base_params), model_blob,
             None if bounds is None else bounds.clip_norm, None if bounds is None else bounds.weight_cap),
        )
        self._write("DELETE FROM partial_sums WHERE round < ?", (round,))
        self._write("DELETE FROM contributors WHERE round < ?", (round,))
        self._write("DELETE FROM accepted WHERE round < ?", (keep_accepted_from,))
        self._write("UPDATE accepted SET delta = NULL WHERE round < ? AND delta IS NOT NULL", (round,))
        self._write(
            "INSERT OR REPLACE INTO replay_snapshot (id, state, seq) VALUES (1, ?, ?)",
            (json.dumps(replay.state, sort_keys=True), replay.seq),
        )

    def insert_acceptance(self, acceptance: Acceptance, *, delta: Mapping[str, np.ndarray] | None = None) -> int:
        """Record an accepted update (with its delta for buffered rules); its ``seq``. AcceptanceConflict if taken."""
        try:
            cursor = self._write(
                "INSERT INTO accepted (sender, round, nonce, digest, sample_count, weight, member, delta, norm)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    acceptance.sender,
                    acceptance.round,
                    acceptance.nonce,
                    acceptance.digest,
                    acceptance.sample_count,
                    acceptance.weight,
                    self._member,
                    None if delta is None else pack_params(delta),
                    acceptance.norm,
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise AcceptanceConflict(f"{acceptance.sender} round {acceptance.round} is already accepted") from exc
        if cursor.lastrowid is None:  # cannot happen for a rowid table; checked rather than assumed
            raise StoreError("SQLite returned no rowid for an accepted update")
        return cursor.lastrowid

    def write_partial(self, round: int, partial: PartialSum) -> None:
        """Replace this member's partial sum for ``round``."""
        state = partial.state
        self._write(
            "INSERT OR REPLACE INTO partial_sums (member, round, count, total_weight, samples, sums) VALUES (?, ?, ?, ?, ?, ?)",
            (self._member, round, state.count, state.total_weight, partial.samples, pack_params(state.sums)),
        )

    def close_round(self, round: int, closing: ClosedRound) -> None:
        """Mark ``round`` closed with its result; RoundStateError unless it is the current, collecting round."""
        cursor = self._write(
            "UPDATE round_state SET status = 'closed', closed_mean = ?, closed_updates = ?, closed_samples = ?,"
            " closed_params = ?, closed_blob = ?, closed_nonce = ? WHERE id = 1 AND round = ? AND status = 'collecting'",
            (
                None if closing.mean_delta is None else pack_params(closing.mean_delta),
                closing.update_count,
                closing.sample_count,
                None if closing.result_params is None else pack_params(closing.result_params),
                closing.result_blob,
                closing.result_nonce,
                round,
            ),
        )
        if cursor.rowcount != 1:
            raise RoundStateError(f"round {round} is not the current collecting round")

    def record_forward(self, round: int, nonce: bytes, outcome: ForwardOutcome) -> bool:
        """Store the tier above's answer to round ``round``'s aggregate ``nonce``; False when that is not the
        current closed round's aggregate or an answer is already stored (the first answer stands)."""
        cursor = self._write(
            "UPDATE round_state SET forward_status = ?, forward_receipt = ? WHERE id = 1 AND round = ? AND status = 'closed'"
            " AND closed_nonce = ? AND forward_status IS NULL",
            (outcome.status, outcome.receipt, round, nonce),
        )
        return cursor.rowcount == 1

    def insert_contributors(self, round: int, region: str, devices: Sequence[tuple[str, int]]) -> None:
        """Record that ``region`` counted ``devices`` ((device, weight) pairs) in ``round``; AcceptanceConflict if one
        is already counted."""
        try:
            for device, weight in devices:
                self._write("INSERT INTO contributors (round, device, region, weight) VALUES (?, ?, ?, ?)",
                            (round, device, region, weight))
        except sqlite3.IntegrityError as exc:
            raise AcceptanceConflict(f"a device of {region} is already counted in round {round}") from exc

    def add_counters(self, counts: Mapping[str, int]) -> None:
        """Add ``counts`` to the stored counters (increments, so members never overwrite each other)."""
        for name, count in counts.items():
            if count:
                self._write(
                    "INSERT INTO counters (name, count) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET count = count + excluded.count",
                    (name, count),
                )


def _partial(row: tuple[Any, ...]) -> PartialSum:
    count, total_weight, samples, sums = row
    return PartialSum(state=WeightedMeanState(sums=unpack_params(sums), total_weight=total_weight, count=count), samples=samples)
