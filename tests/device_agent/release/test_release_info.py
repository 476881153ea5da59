"""The fedge part of release metadata: one schema written by the operator, parsed by the device, every refusal named."""

from __future__ import annotations

import hashlib

import pytest

from device_agent.release.release_info import (
    ReleaseInfo,
    ReleaseMetadataError,
    ReleaseTargets,
    SharedStart,
    Stage,
    StageRecord,
    chunk_digests,
    parse_release,
    parse_stage,
    release_number,
    release_path,
    stage_path,
)

DATA = bytes(range(256)) * 20  # 5,120 bytes


def info(**changes) -> ReleaseInfo:
    values = dict(path=release_path(3), length=len(DATA), sha256=hashlib.sha256(DATA).hexdigest(), release=3,
                  bundle_version=4, model_name="digits-mlp", fleet="demo", targets=ReleaseTargets(regions=("eu",)),
                  canary=("eu-1",), expires_ms=1_800_000_000_000, chunk_size=2048, chunk_sha256=chunk_digests(DATA, 2048),
                  shared_start=SharedStart.BUNDLE, max_accuracy_drop_pct=15)
    values.update(changes)
    return ReleaseInfo(**values)


def test_release_round_trips_through_its_custom_object() -> None:
    original = info()
    assert parse_release(original.path, original.length, {"sha256": original.sha256}, original.to_custom()) == original
    assert original.chunks == 3 and [original.chunk_length(i) for i in range(3)] == [2048, 2048, 1024]
    with pytest.raises(IndexError):
        original.chunk_length(3)


def test_chunk_digests_cover_the_data_in_order() -> None:
    digests = chunk_digests(DATA, 2048)
    assert digests == tuple(hashlib.sha256(DATA[i:i + 2048]).hexdigest() for i in (0, 2048, 4096))
    assert chunk_digests(b"", 1024) == (hashlib.sha256(b"").hexdigest(),)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("canary"), "keys"),
    (lambda d: d.update(chunk_sha256=d["chunk_sha256"][:2]), "need 3"),
    (lambda d: d.update(chunk_sha256=["Z" * 64] * 3), "lowercase SHA-256"),
    (lambda d: d.update(release=4), "must live at releases/4/bundle.fedge"),
    (lambda d: d.update(shared_start="both"), "shared_start"),
    (lambda d: d.update(max_accuracy_drop_pct=101), "max_accuracy_drop_pct"),
    (lambda d: d.update(canary=["eu-1", "eu-1"]), "twice"),
    (lambda d: d.update(regions="eu"), "list of ids"),
    (lambda d: d.update(fleet="bad/fleet"), "fleet"),
    (lambda d: d.update(chunk_size=100), "chunk_size"),
])
def test_parse_release_refuses_malformed_metadata(change, message: str) -> None:
    custom = info().to_custom()
    change(custom["fedge"])
    with pytest.raises(ReleaseMetadataError, match=message):
        parse_release(release_path(3), len(DATA), {"sha256": hashlib.sha256(DATA).hexdigest()}, custom)
    with pytest.raises(ReleaseMetadataError, match="no custom.fedge"):
        parse_release(release_path(3), len(DATA), {}, {"other": 1})


def test_stage_records_round_trip_and_refuse_mismatches() -> None:
    record = StageRecord(release=3, stage=Stage.HALTED, reason="canary eu-1 diverged", decided_ms=5)
    assert parse_stage(stage_path(3), record.to_custom()) == record
    assert record.stage.withdrawn and Stage.ROLLED_BACK.withdrawn and not Stage.PROMOTED.withdrawn
    with pytest.raises(ReleaseMetadataError, match="must live at rollout/release-3"):
        parse_stage(stage_path(4), record.to_custom())
    bad = record.to_custom()
    bad["fedge_stage"]["stage"] = "paused"
    with pytest.raises(ReleaseMetadataError, match="stage 'paused'"):
        parse_stage(stage_path(3), bad)
    with pytest.raises(ReleaseMetadataError, match="reason"):
        StageRecord(release=3, stage=Stage.HALTED, reason="\n")


def test_release_number_reads_only_release_paths() -> None:
    assert release_number("releases/12/bundle.fedge") == 12
    for path in ("releases/012/bundle.fedge", "releases/x/bundle.fedge", "rollout/release-1", "releases/1/other"):
        assert release_number(path) is None


def test_targets_match_and_describe() -> None:
    targets = ReleaseTargets(regions=("eu",), groups=("gw",))
    assert targets.matches(device="d", region="eu", groups=("gw", "x"))
    assert not targets.matches(device="d", region="eu", groups=())
    assert targets.describe() == "regions eu; groups gw" and ReleaseTargets().describe() == "fleet"
    assert info().is_canary("eu-1") and not info().is_canary("eu-2")
    assert info().expired(1_800_000_000_000) and not info().expired(1_799_999_999_999)
