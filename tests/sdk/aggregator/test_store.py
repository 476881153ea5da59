"""The SQLite store: durability settings, atomic transactions, uniqueness, identity and member locks."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sdk.aggregation import WeightedMeanState
from sdk.aggregator import AggregatorStore, RoundStatus, StoreError
from sdk.aggregator.records import Acceptance, PartialSum, ReplaySnapshot
from sdk.aggregator.store import AcceptanceConflict

REPO = Path(__file__).resolve().parents[3]


def _open(path: Path, member: str = "main", identity: str = "region:demo/eu") -> AggregatorStore:
    return AggregatorStore.open(path, identity=identity, member=member)


def _acceptance(sender: str = "dev-1", nonce: bytes = b"\x01" * 16) -> Acceptance:
    return Acceptance(sender=sender, round=0, nonce=nonce, digest=b"\x00" * 32, sample_count=10, weight=10.0)


def _begin(store: AggregatorStore, round: int = 0) -> None:
    params = {"w": np.ones((2, 2), dtype=np.float32)}
    with store.transaction():
        store.begin_round(
            round=round,
            global_params=params,
            base_params=params,
            model_blob=b"model",
            replay=ReplaySnapshot(state={"version": 1, "rounds": 8, "floor": 0, "senders": {}}, seq=0),
            keep_accepted_from=0,
        )


def test_store_uses_wal_and_full_synchronous(tmp_path: Path) -> None:
    store = _open(tmp_path / "s.sqlite")
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL
    store.close()


def test_store_round_state_survives_reopen(tmp_path: Path) -> None:
    store = _open(tmp_path / "s.sqlite")
    _begin(store, round=3)
    store.close()
    store = _open(tmp_path / "s.sqlite")
    record = store.load_round()
    assert record is not None and record.round == 3 and record.status is RoundStatus.COLLECTING
    assert record.model_blob == b"model"
    np.testing.assert_array_equal(record.global_params["w"], np.ones((2, 2), dtype=np.float32))
    store.close()


def test_store_accepts_one_update_per_sender_and_round(tmp_path: Path) -> None:
    store = _open(tmp_path / "s.sqlite")
    _begin(store)
    with store.transaction():
        store.insert_acceptance(_acceptance())
    for other in (_acceptance(), _acceptance(nonce=b"\x02" * 16)):
        with pytest.raises(AcceptanceConflict), store.transaction():
            store.insert_acceptance(other)
    assert store.find_acceptance("dev-1", 0) == _acceptance()
    assert store.find_acceptance("dev-2", 0) is None
    store.close()


def test_store_transaction_rolls_back_every_write_on_error(tmp_path: Path) -> None:
    store = _open(tmp_path / "s.sqlite")
    _begin(store)
    partial = PartialSum(state=WeightedMeanState(sums={"w": np.full((2, 2), 3.0)}, total_weight=3.0, count=1), samples=3)
    with pytest.raises(RuntimeError, match="crash"), store.transaction():
        store.insert_acceptance(_acceptance())
        store.write_partial(0, partial)
        store.add_counters({"rejected:norm": 1})
        raise RuntimeError("crash before commit")
    assert store.find_acceptance("dev-1", 0) is None
    assert store.load_partial(0) is None
    assert store.counters() == {}
    store.close()


def test_store_refuses_writes_outside_a_transaction(tmp_path: Path) -> None:
    store = _open(tmp_path / "s.sqlite")
    with pytest.raises(RuntimeError, match="inside transaction"):
        store.insert_acceptance(_acceptance())
    store.close()


def test_store_partial_sums_round_trip_bit_for_bit(tmp_path: Path) -> None:
    store = _open(tmp_path / "s.sqlite")
    _begin(store)
    sums = {"w": np.random.default_rng(0).normal(size=(2, 2)) * 1e-3 + 1e9}  # float64 values float32 cannot hold
    with store.transaction():
        store.write_partial(0, PartialSum(state=WeightedMeanState(sums=sums, total_weight=0.1 + 0.2, count=2), samples=7))
    store.close()
    store = _open(tmp_path / "s.sqlite")
    partial = store.load_partial(0)
    assert partial is not None
    assert partial.state.sums["w"].dtype == np.float64
    assert partial.state.sums["w"].tobytes() == sums["w"].tobytes()
    assert partial.state.total_weight == 0.1 + 0.2 and partial.state.count == 2 and partial.samples == 7
    store.close()


def test_store_counters_are_increments_across_members(tmp_path: Path) -> None:
    a, b = _open(tmp_path / "s.sqlite", "a"), _open(tmp_path / "s.sqlite", "b")
    with a.transaction():
        a.add_counters({"rejected:auth": 2, "duplicate": 1})
    with b.transaction():
        b.add_counters({"rejected:auth": 3})
    assert a.counters() == {"duplicate": 1, "rejected:auth": 5}
    a.close()
    b.close()


def test_store_belongs_to_one_aggregator(tmp_path: Path) -> None:
    _open(tmp_path / "s.sqlite").close()
    with pytest.raises(StoreError, match="belongs to"):
        _open(tmp_path / "s.sqlite", identity="region:demo/us")


def test_store_member_is_exclusive_while_open(tmp_path: Path) -> None:
    first = _open(tmp_path / "s.sqlite")
    with pytest.raises(StoreError, match="already open"):
        _open(tmp_path / "s.sqlite")
    other = _open(tmp_path / "s.sqlite", member="second")  # another member may share the file
    first.close()
    _open(tmp_path / "s.sqlite").close()  # the lock is released with the store
    other.close()


def test_store_transaction_waits_for_another_writer_then_gives_up_at_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    quick = AggregatorStore.open(path, identity="region:f/eu", member="a", busy_timeout_s=0.05)
    patient = AggregatorStore.open(path, identity="region:f/eu", member="b", busy_timeout_s=30.0)
    held, go, released = threading.Event(), threading.Event(), []

    def other_member() -> None:  # holds the write lock until the main thread is about to write
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        held.set()
        go.wait(30)
        released.append(time.monotonic())
        holder.execute("ROLLBACK")
        holder.close()

    quick_waits: list[float] = []
    patient_waits: list[float] = []
    quick.lock_wait_observer, patient.lock_wait_observer = quick_waits.append, patient_waits.append
    thread = threading.Thread(target=other_member)
    thread.start()
    try:
        assert held.wait(30)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            with quick.transaction():
                pass
        assert quick_waits == []  # no lock, no wait reported
        assert quick.pragma("synchronous") == 2  # still FULL: only the lock wait was changed, and restored
        go.set()
        with patient.transaction():  # waits (polling) for the other member's lock, then writes
            began = time.monotonic()
            patient.add_counters({"waited": 1})
        assert released and began >= released[0] and patient.counters() == {"waited": 1}
        assert len(patient_waits) == 1 and 0.0 <= patient_waits[0] < 30.0  # one report per transaction begun
    finally:
        go.set()
        thread.join(30)
        quick.close()
        patient.close()


_OPEN_AT = """
import sys, time
from sdk.aggregator.store import AggregatorStore
member, *pairs = sys.argv[1:]
for path, at in zip(pairs[::2], pairs[1::2]):
    while time.time() < float(at):  # both members reach this open at the same instant
        pass
    try:
        AggregatorStore.open(path, identity="region:f/eu", member=member).close()
        print("ok", flush=True)
    except Exception as exc:
        print(f"failed: {type(exc).__name__}: {exc}", flush=True)
"""


def test_store_two_members_opening_a_new_store_at_the_same_instant_both_open(tmp_path: Path) -> None:
    # Both switch the new file to WAL; SQLite answers the second "database is locked" at once, without its busy
    # handler. Before the open retried that, one of the two failed about once in three tries (a race: ten tries).
    start = time.time() + 1.5  # after both interpreters have imported the store
    args = [str(a) for i in range(10) for a in (tmp_path / f"region-{i}.sqlite", start + 0.1 * i)]
    members = [subprocess.Popen([sys.executable, "-c", _OPEN_AT, m, *args], stdout=subprocess.PIPE, text=True, cwd=REPO)
               for m in ("m0", "m1")]
    outputs = [p.communicate(timeout=60)[0].splitlines() for p in members]
    assert outputs == [["ok"] * 10, ["ok"] * 10]
