"""The agent's state files: pending update commit protocol and progress, including damaged files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_agent.daemon.agent_state import AgentProgress, AgentStateFiles, SealedUpdate
from device_agent.errors import StateError
from device_agent.protocol.headers import UpdateHeader


def sealed(round_number: int = 4, blob: bytes = b"FDGU sealed bytes") -> SealedUpdate:
    header = UpdateHeader(fleet="itest", region="eu", sender="dev-1", round=round_number, bundle_version=1,
                          sample_count=10, nonce=bytes([round_number]) * 16, timestamp_ms=1)
    return SealedUpdate(header=header, blob=blob)


def test_state_pending_update_round_trips_exactly(tmp_path: Path):
    files = AgentStateFiles(tmp_path / "state")
    assert files.load_pending() is None
    files.save_pending(sealed())
    assert AgentStateFiles(tmp_path / "state").load_pending() == sealed()
    files.clear_pending()
    assert files.load_pending() is None
    files.clear_pending()  # idempotent


def test_state_pending_blob_without_its_commit_record_is_not_pending(tmp_path: Path):
    files = AgentStateFiles(tmp_path)
    files.save_pending(sealed(4))
    (tmp_path / "pending-update.bin").write_bytes(sealed(5, b"newer bytes").blob)  # crash before the .json
    assert files.load_pending() is None
    assert not (tmp_path / "pending-update.bin").exists()


@pytest.mark.parametrize("damage", [
    lambda d: (d / "pending-update.bin").unlink(),
    lambda d: (d / "pending-update.json").write_text("{not json"),
    lambda d: (d / "pending-update.json").write_text(json.dumps({"version": 9})),
    lambda d: (d / "pending-update.json").write_text(
        json.dumps({"version": 1, "header": "{}", "sha256": "00"})),
])
def test_state_damaged_pending_update_is_dropped_not_sent(tmp_path: Path, damage, caplog):
    files = AgentStateFiles(tmp_path)
    files.save_pending(sealed())
    damage(tmp_path)
    assert files.load_pending() is None
    assert "dropping the pending update" in caplog.text


def test_state_progress_round_trips_and_defaults(tmp_path: Path):
    files = AgentStateFiles(tmp_path)
    assert files.load_progress() == AgentProgress(completed_round=-1, highest_model_round=-1, last_receipt=None)
    progress = AgentProgress(bundle_version=2, completed_round=3, highest_model_round=4, last_receipt=b"\x00FDGR")
    files.save_progress(progress)
    assert AgentStateFiles(tmp_path).load_progress() == progress


@pytest.mark.parametrize("text", ["{", '{"version": 1}', '{"version": 2, "completed_round": 0}',
                                  '{"version": 1, "completed_round": -5, "highest_model_round": 0, "last_receipt": null}'])
def test_state_damaged_progress_is_an_error_naming_the_file(tmp_path: Path, text: str):
    (tmp_path / "progress.json").write_text(text)
    with pytest.raises(StateError, match="progress.json"):
        AgentStateFiles(tmp_path).load_progress()
