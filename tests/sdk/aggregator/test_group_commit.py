"""Group commit through the real intake: a batch is folded, committed once, and only then acknowledged.

The crash test kills a real process (SIGKILL) between the fold and the commit of a batch, on a
real SQLite file: nothing acknowledged is lost, nothing is counted twice, and after a restart the
resent batch gives the fault-free result bit for bit.
"""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from device_agent.protocol.envelope import sign_model
from device_agent.protocol.headers import ModelHeader
from device_agent.protocol.topics import TopicLayout
from sdk.aggregator import IncomingUpdate, RegionalAggregate, RegionalAggregator, Verdict
from sdk.aggregator.batching import BatchLimits, UpdateBatch
from sdk.aggregator.regional_service import RegionalService
from sdk.aggregator.service_config import BrokerSettings, LoopSettings
from tests.sdk.aggregator import scenario

REPO = Path(__file__).resolve().parents[3]
BATCH = 3


@pytest.fixture(scope="module")
def updates() -> list[scenario.DeviceUpdate]:
    return scenario.device_updates(count=6, seed=11)


@pytest.fixture(scope="module")
def blobs(updates: list[scenario.DeviceUpdate]) -> list[bytes]:
    """Six devices' sealed updates for round 0, sealed once so every run sees the same bytes."""
    return [scenario.seal(update) for update in updates]


def _batches(region: RegionalAggregator, blobs: list[bytes], size: int) -> list[Verdict]:
    verdicts = []
    for start in range(0, len(blobs), size):
        verdicts += [h.verdict for h in region.handle_updates([IncomingUpdate(blob=b) for b in blobs[start:start + size]])]
    return verdicts


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory: pytest.TempPathFactory, blobs: list[bytes]) -> RegionalAggregate:
    with RegionalAggregator.open(tmp_path_factory.mktemp("reference") / "eu.sqlite", scenario.regional_config("eu", policy=scenario.RoundPolicy(quorum=6, deadline_s=60.0))) as region:
        region.start_round(0, scenario.initial_model())
        assert _batches(region, blobs, BATCH) == [Verdict.ACCEPTED] * len(blobs)
        return region.close_round()


def _six(open_region: Callable[..., RegionalAggregator], **overrides: object) -> RegionalAggregator:
    region = open_region(policy=scenario.RoundPolicy(quorum=6, deadline_s=60.0), **overrides)
    region.start_round(0, scenario.initial_model())
    return region


def test_group_commit_bad_updates_in_a_batch_are_rejected_alone_and_the_good_ones_commit_once(
    open_region: Callable[..., RegionalAggregator], updates: list[scenario.DeviceUpdate], blobs: list[bytes],
) -> None:
    region = _six(open_region)
    commits: list[float] = []
    region.observe_commits(commits.append)
    too_long = {name: value * 1000 for name, value in updates[2].delta.items()}
    batch = [
        blobs[0],
        b"not a sealed update",                                                   # malformed
        scenario.seal(updates[1], key=scenario.signing_key("intruder")),          # auth
        scenario.seal(updates[2], delta=too_long),                                # norm
        blobs[3],
        blobs[0],                                                                 # the same update again: duplicate
        scenario.seal(updates[3], nonce=scenario.random_nonce()),                 # 2nd update of a sender: already_counted
        scenario.seal(updates[4], round=1),                                       # future_round
        blobs[5],
    ]
    answers = region.handle_updates([IncomingUpdate(blob=b) for b in batch])

    assert [(a.verdict, a.reason) for a in answers] == [
        (Verdict.ACCEPTED, ""), (Verdict.REJECTED, "malformed"), (Verdict.REJECTED, "auth"), (Verdict.REJECTED, "norm"),
        (Verdict.ACCEPTED, ""), (Verdict.DUPLICATE, ""), (Verdict.REJECTED, "already_counted"),
        (Verdict.REJECTED, "future_round"), (Verdict.ACCEPTED, "")]
    assert [a.receipt is None for a in answers] == [False, True, True, False, False, False, False, False, False]
    assert len(commits) == 1  # one transaction for the three acceptances
    status = region.status()
    assert (status.accepted, status.samples) == (3, sum(updates[i].samples for i in (0, 3, 5)))
    assert status.rejections() == {"malformed": 1, "auth": 1, "norm": 1, "already_counted": 1, "future_round": 1}
    assert status.counters["duplicate"] == 1
    aggregate = region.close_round()
    assert aggregate.mean_delta is not None
    expected = scenario.reference_mean([updates[i] for i in (0, 3, 5)])
    for name, value in expected.items():
        np.testing.assert_allclose(aggregate.mean_delta[name], value, rtol=1e-5, atol=1e-6)


def test_group_commit_batch_boundaries(open_region: Callable[..., RegionalAggregator], blobs: list[bytes],
                                       fault_free: RegionalAggregate) -> None:
    region = _six(open_region)
    commits: list[float] = []
    region.observe_commits(commits.append)
    assert region.handle_updates([]) == []
    rejected = region.handle_updates([IncomingUpdate(blob=b"x"), IncomingUpdate(blob=b"y")])
    assert [a.reason for a in rejected] == ["malformed", "malformed"] and commits == []  # nothing to commit
    # One batch of all six equals three batches of two and the fault-free batches of three, bit for bit.
    assert [a.verdict for a in region.handle_updates([IncomingUpdate(blob=b) for b in blobs])] == [Verdict.ACCEPTED] * 6
    assert len(commits) == 1
    aggregate = region.close_round()
    again = open_region(db="pairs.sqlite", policy=scenario.RoundPolicy(quorum=6, deadline_s=60.0))
    again.start_round(0, scenario.initial_model())
    assert _batches(again, blobs, 2) == [Verdict.ACCEPTED] * 6
    for result in (aggregate, again.close_round()):
        assert result.mean_delta is not None and fault_free.mean_delta is not None
        assert all(result.mean_delta[n].tobytes() == fault_free.mean_delta[n].tobytes() for n in fault_free.mean_delta)
    # A resend arriving with its own batch-mate copy after the round closed: both answered, nothing counted.
    resent = region.handle_updates([IncomingUpdate(blob=blobs[1]), IncomingUpdate(blob=blobs[1])])
    assert [a.verdict for a in resent] == [Verdict.DUPLICATE, Verdict.DUPLICATE]
    assert region.status().accepted == 6


def test_group_commit_topic_sender_is_checked_per_update(open_region: Callable[..., RegionalAggregator],
                                                          updates: list[scenario.DeviceUpdate], blobs: list[bytes]) -> None:
    region = _six(open_region)
    answers = region.handle_updates([IncomingUpdate(blob=blobs[0], topic_sender=updates[0].device),
                                     IncomingUpdate(blob=blobs[1], topic_sender=updates[2].device)])
    assert [(a.verdict, a.reason) for a in answers] == [(Verdict.ACCEPTED, ""), (Verdict.REJECTED, "auth")]


def test_group_commit_two_members_taking_copies_of_one_update_count_it_once(
    open_region: Callable[..., RegionalAggregator], updates: list[scenario.DeviceUpdate], blobs: list[bytes],
) -> None:
    a = _six(open_region, db="shared.sqlite", member="a")
    b = open_region(db="shared.sqlite", member="b", policy=scenario.RoundPolicy(quorum=6, deadline_s=60.0))
    first = a.handle_updates([IncomingUpdate(blob=b_) for b_ in blobs[:3]])
    second = b.handle_updates([IncomingUpdate(blob=b_) for b_ in blobs[2:]])  # blobs[2] already counted by a
    assert [h.verdict for h in first] == [Verdict.ACCEPTED] * 3
    assert [h.verdict for h in second] == [Verdict.DUPLICATE] + [Verdict.ACCEPTED] * 3
    assert b.status().accepted == 6
    # b's lookup of blobs[2]'s sender found a's row: a duplicate, counted once; the mean counts each update once.
    closed = b.close_round()
    assert closed.update_count == 6 and closed.mean_delta is not None
    for name, value in scenario.reference_mean(updates).items():
        np.testing.assert_allclose(closed.mean_delta[name], value, rtol=1e-5, atol=1e-6)


def test_batch_limits_close_a_batch_by_count_bytes_and_latency() -> None:
    clock = scenario.StepClock()
    batch: UpdateBatch[str] = UpdateBatch(BatchLimits(max_updates=3, max_bytes=100, max_wait_s=0.01), clock=clock)
    assert batch.due_in() is None and not batch.due() and batch.drain() == []
    assert batch.add("a", 10) is False and batch.due_in() == pytest.approx(0.01) and not batch.due()
    clock.advance(0.004)
    assert batch.add("b", 10) is False and batch.due_in() == pytest.approx(0.006)  # the cap runs from the first item
    assert batch.add("c", 10) is True and batch.due()  # full by count
    assert batch.drain() == ["a", "b", "c"] and len(batch) == 0 and batch.due_in() is None
    assert batch.add("big", 150) is True  # one item above max_bytes is still a batch of one
    batch.drain()
    batch.add("d", 1)
    clock.advance(0.01)
    assert batch.due() and batch.due_in() == 0.0
    with pytest.raises(ValueError, match="max_updates"):
        BatchLimits(max_updates=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        BatchLimits(max_wait_s=float("nan"))


class _Lines:
    """The lines of a child's pipe, read by a thread, awaited with a bounded timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.strip())
        self._queue.put(None)

    def until(self, wanted: str, timeout_s: float = 30.0) -> list[str]:
        """Lines up to and including the first containing ``wanted``."""
        start = len(self.seen)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {wanted!r} from the child within {timeout_s} s; got {self.seen}") from None
            assert line is not None, f"the child ended before {wanted!r}; got {self.seen}"
            self.seen.append(line)
            if wanted in line:
                return self.seen[start:]


def test_group_commit_sigkill_between_fold_and_commit_loses_nothing_acknowledged_and_counts_nothing_twice(
    tmp_path: Path, blobs: list[bytes], fault_free: RegionalAggregate,
) -> None:
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    for i, blob in enumerate(blobs):
        (blob_dir / f"{i:02d}.blob").write_bytes(blob)
    db = tmp_path / "eu.sqlite"
    with RegionalAggregator.open(db, scenario.regional_config("eu", policy=scenario.RoundPolicy(quorum=6, deadline_s=60.0))) as region:
        region.start_round(0, scenario.initial_model())
    child = subprocess.Popen([sys.executable, "-m", "tests.sdk.aggregator.batch_crash_child", str(db), str(blob_dir), str(BATCH)],
                             cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    holder = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        assert child.stdin is not None and child.stdout is not None and child.stderr is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = _Lines(child.stdout), _Lines(child.stderr)
        acknowledged = out.until("batch")[:-1]  # batch 1: committed, then acknowledged
        assert acknowledged == [f"accepted {i:02d}.blob" for i in range(BATCH)]
        holder.execute("BEGIN IMMEDIATE")  # the write lock: the child's next commit must wait for it
        child.stdin.write("go\n")
        child.stdin.flush()
        err.until("folded, committing")  # batch 2 is folded, its transaction not committed
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        holder.execute("ROLLBACK")
    finally:
        holder.close()
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdin, child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    with RegionalAggregator.open(db, scenario.regional_config("eu", policy=scenario.RoundPolicy(quorum=6, deadline_s=60.0))) as region:
        status = region.status()
        assert status.accepted == BATCH  # what was acknowledged is there; the killed batch left nothing
        # Devices resend everything without a receipt, and (lost receipts) some that had one: each counts once.
        assert _batches(region, blobs, BATCH) == [Verdict.DUPLICATE] * BATCH + [Verdict.ACCEPTED] * BATCH
        aggregate = region.close_round()
    assert (aggregate.update_count, aggregate.sample_count) == (fault_free.update_count, fault_free.sample_count)
    assert aggregate.mean_delta is not None and fault_free.mean_delta is not None
    for name in fault_free.mean_delta:
        assert aggregate.mean_delta[name].tobytes() == fault_free.mean_delta[name].tobytes()


def test_group_commit_service_queues_updates_and_decides_them_before_the_next_rounds_model(
    open_region: Callable[..., RegionalAggregator], updates: list[scenario.DeviceUpdate], blobs: list[bytes],
) -> None:
    region = _six(open_region)
    layout = TopicLayout(fleet=scenario.FLEET)
    service = RegionalService(region, region="eu", layout=layout, broker=BrokerSettings(host="127.0.0.1", port=1, client_id="eu-t"),
                              loop=LoopSettings(batch_max_updates=3, batch_max_wait_s=1.0))  # never connected: no broker needed
    for update, blob in zip(updates[:2], blobs[:2]):
        service.handle_message(layout.device_update(update.device), blob)
    service.flush_batch()  # neither full nor past its latency cap: still waiting
    assert region.status().accepted == 0 and service.batch_due_in() is not None
    service.handle_message(layout.device_update(updates[2].device), blobs[2])
    service.flush_batch()  # full: one commit for the three
    assert region.status().accepted == 3 and service.batch_due_in() is None
    service.handle_message(layout.device_update(updates[3].device), blobs[3])
    model = sign_model(ModelHeader.create(fleet=scenario.FLEET, sender="root", round=1, bundle_version=scenario.BUNDLE_VERSION),
                       scenario.initial_model(), signer_key=scenario.signing_key("root"))
    service.handle_message(layout.root_model, model)  # the queued update is decided in round 0, then round 1 starts
    status = region.status()
    assert (status.round, status.counters["abandoned_updates"]) == (1, 4) and "stale_round" not in status.rejections()


def test_group_commit_runs_numpy_blas_single_threaded_and_restores_it(
    open_region: Callable[..., RegionalAggregator], blobs: list[bytes],
) -> None:
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    region = _six(open_region)
    seen: list[set[int]] = []
    region.observe_commits(lambda _seconds: seen.append(blas_threads()))  # called inside the batch, at its commit
    with threadpool_limits(limits=2, user_api="blas"):  # as numpy starts on a multi-core host
        assert blas_threads() == {2}
        assert all(h.accepted for h in region.handle_updates([IncomingUpdate(blob=b) for b in blobs[:2]]))
        assert seen == [{1}] and blas_threads() == {2}


def test_the_blas_pools_are_inspected_again_after_an_import() -> None:
    """A library imported after the intake's first batch may bring its own BLAS: the cached pool list is renewed
    when the number of imported modules changes (a BLAS loaded later stayed multi-threaded before)."""
    import sys
    import types

    from sdk.aggregator import intake

    first = intake._blas_controller(len(sys.modules))
    assert intake._blas_controller(len(sys.modules)) is first  # cached while nothing is imported
    sys.modules["_fedge_test_fresh_module"] = types.ModuleType("_fedge_test_fresh_module")
    try:
        assert intake._blas_controller(len(sys.modules)) is not first
    finally:
        del sys.modules["_fedge_test_fresh_module"]
