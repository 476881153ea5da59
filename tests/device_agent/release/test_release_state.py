"""The device's release memory survives restarts, refuses damage loudly, and stays bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.errors import StateError
from device_agent.release.release_state import MAX_REMEMBERED, PendingTrial, ReleaseMemory, ReleaseReport, ReleaseStateFile


def test_release_state_round_trips(tmp_path: Path) -> None:
    file = ReleaseStateFile(tmp_path)
    assert file.load() == ReleaseMemory()
    memory = ReleaseMemory(running_release=3, previous_release=2, failed=(1,), refused={4: "downgrade: v1 < v2"},
                           trial=PendingTrial(release=3, baseline_accuracy=0.91, previous_version=2, max_accuracy_drop_pct=15),
                           report=ReleaseReport(state="installing", release=3, progress=100, baseline_accuracy=0.91))
    file.save(memory)
    assert ReleaseStateFile(tmp_path).load() == memory


def test_release_state_refuses_a_damaged_file(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"version": 1}')
    with pytest.raises(StateError, match="keeps failed releases out"):
        ReleaseStateFile(tmp_path).load()
    (tmp_path / "state.json").write_text("{")
    with pytest.raises(StateError, match="unreadable"):
        ReleaseStateFile(tmp_path).load()


def test_release_memory_is_bounded() -> None:
    memory = ReleaseMemory()
    for number in range(1, MAX_REMEMBERED + 11):
        memory = memory.with_refused(number, "x").with_failed(number)
    assert len(memory.refused) == MAX_REMEMBERED and min(memory.refused) == 11
    assert len(memory.failed) == MAX_REMEMBERED and memory.failed[0] == 11
