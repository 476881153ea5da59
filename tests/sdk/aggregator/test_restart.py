"""Crash and restart: whatever was committed is kept exactly once, and the result equals a fault-free run bit for bit."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sdk.aggregator import RegionalAggregate, RegionalAggregator, Verdict
from tests.sdk.aggregator import scenario

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    """Five devices' sealed updates for round 0, sealed once so every run sees the same bytes."""
    return [scenario.seal(update) for update in scenario.device_updates(count=5, seed=3)]


def _open(path: Path) -> RegionalAggregator:
    return RegionalAggregator.open(path, scenario.regional_config("eu"))


def _started(path: Path) -> RegionalAggregator:
    region = _open(path)
    region.start_round(0, scenario.initial_model())
    return region


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory: pytest.TempPathFactory, blobs: list[bytes]) -> RegionalAggregate:
    with _started(tmp_path_factory.mktemp("reference") / "eu.sqlite") as region:
        assert all(region.handle_update(blob).verdict is Verdict.ACCEPTED for blob in blobs)
        return region.close_round()


def _assert_identical(actual: RegionalAggregate, expected: RegionalAggregate) -> None:
    assert (actual.update_count, actual.sample_count) == (expected.update_count, expected.sample_count)
    assert actual.mean_delta is not None and expected.mean_delta is not None
    for name in expected.mean_delta:
        assert actual.mean_delta[name].tobytes() == expected.mean_delta[name].tobytes()
        assert actual.regional_params[name].tobytes() == expected.regional_params[name].tobytes()


def test_restart_after_dropping_the_object_equals_the_fault_free_run(
    tmp_path: Path, blobs: list[bytes], fault_free: RegionalAggregate
) -> None:
    db = tmp_path / "eu.sqlite"
    region = _started(db)
    for blob in blobs[:3]:
        assert region.handle_update(blob).verdict is Verdict.ACCEPTED
    del region  # no close(): the process state is simply gone
    gc.collect()

    with _open(db) as region:
        assert region.status().accepted == 3
        verdicts = [region.handle_update(blob).verdict for blob in [*blobs[3:], blobs[0]]]
        assert verdicts == [Verdict.ACCEPTED, Verdict.ACCEPTED, Verdict.DUPLICATE]
        _assert_identical(region.close_round(), fault_free)


def _run_child(db: Path, blob_dir: Path, *, limit: int, pause_s: float, kill_after_lines: int) -> list[str]:
    """Start crash_child, read ``kill_after_lines`` lines, SIGKILL it; the lines read."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.sdk.aggregator.crash_child", str(db), str(blob_dir), str(limit), str(pause_s)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines: list[str] = []
    try:
        assert child.stdout is not None
        while len(lines) < kill_after_lines:
            line = child.stdout.readline()
            assert line, "the child exited early"
            lines.append(line.strip())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    return lines


def _blob_dir(tmp_path: Path, blobs: list[bytes]) -> Path:
    folder = tmp_path / "blobs"
    folder.mkdir()
    for i, blob in enumerate(blobs):
        (folder / f"{i}.blob").write_bytes(blob)
    return folder


def test_restart_after_sigkill_equals_the_fault_free_run(tmp_path: Path, blobs: list[bytes], fault_free: RegionalAggregate) -> None:
    db = tmp_path / "eu.sqlite"
    _started(db).close()
    lines = _run_child(db, _blob_dir(tmp_path, blobs), limit=3, pause_s=0.0, kill_after_lines=4)
    assert lines == ["accepted 0.blob", "accepted 1.blob", "accepted 2.blob", "done"]

    with _open(db) as region:
        verdicts = [region.handle_update(blob).verdict for blob in [*blobs[3:], blobs[1]]]
        assert verdicts == [Verdict.ACCEPTED, Verdict.ACCEPTED, Verdict.DUPLICATE]
        _assert_identical(region.close_round(), fault_free)


@pytest.mark.parametrize("pause_s", [0.0, 0.01])
def test_sigkill_mid_stream_then_resending_everything_counts_each_update_once(
    pause_s: float, tmp_path: Path, blobs: list[bytes], fault_free: RegionalAggregate
) -> None:
    db = tmp_path / "eu.sqlite"
    _started(db).close()
    # Killed right after the first acknowledgement, while it works through the rest
    # (with no pause the kill lands anywhere, inside a transaction included).
    _run_child(db, _blob_dir(tmp_path, blobs), limit=5, pause_s=pause_s, kill_after_lines=1)

    with _open(db) as region:
        committed = region.status().accepted
        assert 1 <= committed <= 5
        # The devices that got no receipt resend, and so does every one that did: all are safe.
        verdicts = [region.handle_update(blob).verdict for blob in blobs]
        assert verdicts == [Verdict.DUPLICATE] * committed + [Verdict.ACCEPTED] * (5 - committed)
        _assert_identical(region.close_round(), fault_free)


def test_restart_keeps_counters_and_the_replay_window(tmp_path: Path, blobs: list[bytes]) -> None:
    from sdk.aggregator import AggregatorStore

    db = tmp_path / "eu.sqlite"
    with _started(db) as region:
        region.handle_update(blobs[0])
        region.handle_update(b"garbage")
        region.handle_update(blobs[0])
        region.close_round()
        region.start_round(1, scenario.initial_model())
    store = AggregatorStore.open(db, identity="region:demo/eu", member="inspector")
    # Round 0's aggregate was never acknowledged by a root before round 1 started: that is counted too.
    assert store.counters() == {"aggregate_unacknowledged": 1, "duplicate": 1, "rejected:malformed": 1}
    snapshot = store.replay_snapshot()
    assert snapshot is not None
    device = scenario.device_updates(count=5, seed=3)[0]
    assert snapshot.state["senders"][device.device]["seen"] == [[0, device.nonce.hex()]]
    store.close()
