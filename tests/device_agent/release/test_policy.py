"""The device's release decisions and the health rule, pure: every branch."""

from __future__ import annotations

import math

import pytest

from device_agent.bundle.install_policy import InstalledRecord
from device_agent.release.policy import Action, DeviceIdentity, LocalRelease, decide, judge_trial
from device_agent.release.release_info import ReleaseInfo, ReleaseTargets, Stage, StageRecord, chunk_digests, release_path

ME = DeviceIdentity(device="eu-1", fleet="demo", region="eu", groups=("gateways",))
NOW = 1_800_000_000_000


def release(number: int, *, version: int | None = None, canary: tuple[str, ...] = (), targets: ReleaseTargets = ReleaseTargets(),
            fleet: str = "demo", expires_ms: int = NOW + 3_600_000) -> ReleaseInfo:
    data = b"x" * 3000
    return ReleaseInfo(path=release_path(number), length=len(data), sha256="a" * 64, release=number,
                       bundle_version=number + 1 if version is None else version, model_name="m", fleet=fleet,
                       targets=targets, canary=canary, expires_ms=expires_ms, chunk_size=1024,
                       chunk_sha256=chunk_digests(data, 1024))


def stages(**by_number: Stage) -> dict[int, StageRecord]:
    return {int(k[1:]): StageRecord(release=int(k[1:]), stage=v) for k, v in by_number.items()}


def test_decide_fetches_the_newest_promoted_release_for_the_device() -> None:
    found = decide((release(1), release(2)), stages(r1=Stage.PROMOTED, r2=Stage.PROMOTED), identity=ME,
                   local=LocalRelease(bundle_version=1), now_ms=NOW)
    assert found.action is Action.FETCH and found.release.release == 2


def test_decide_canary_releases_only_for_their_canaries() -> None:
    offered = (release(1, canary=("eu-2",)),)
    assert decide(offered, stages(r1=Stage.CANARY), identity=ME, local=LocalRelease(bundle_version=1),
                  now_ms=NOW).action is Action.NONE
    mine = (release(1, canary=("eu-1",)),)
    assert decide(mine, stages(r1=Stage.CANARY), identity=ME, local=LocalRelease(bundle_version=1),
                  now_ms=NOW).action is Action.FETCH
    assert decide(mine, {}, identity=ME, local=LocalRelease(bundle_version=1), now_ms=NOW).action is Action.NONE, "unstaged"


@pytest.mark.parametrize(("targets", "wanted"), [
    (ReleaseTargets(regions=("us",)), False), (ReleaseTargets(regions=("eu", "us")), True),
    (ReleaseTargets(groups=("phones",)), False), (ReleaseTargets(groups=("gateways",)), True),
    (ReleaseTargets(devices=("eu-2",)), False), (ReleaseTargets(regions=("eu",), devices=("eu-1",)), True),
])
def test_decide_follows_the_release_targets(targets: ReleaseTargets, wanted: bool) -> None:
    found = decide((release(1, targets=targets),), stages(r1=Stage.PROMOTED), identity=ME,
                   local=LocalRelease(bundle_version=1), now_ms=NOW)
    assert (found.action is Action.FETCH) is wanted


def test_decide_ignores_other_fleets_history_failures_and_refusals() -> None:
    local = LocalRelease(bundle_version=3, running_release=2, failed=frozenset({3}), refused=frozenset({4}))
    offered = (release(1), release(2), release(3), release(4), release(5, fleet="other"))
    found = decide(offered, stages(r1=Stage.PROMOTED, r2=Stage.PROMOTED, r3=Stage.PROMOTED, r4=Stage.PROMOTED,
                                   r5=Stage.PROMOTED), identity=ME, local=local, now_ms=NOW)
    assert found.action is Action.NONE


def test_decide_refuses_an_expired_release_and_a_downgrade_before_fetching() -> None:
    expired = decide((release(1, expires_ms=NOW - 1),), stages(r1=Stage.PROMOTED), identity=ME,
                     local=LocalRelease(bundle_version=1), now_ms=NOW)
    assert (expired.action, expired.reason) == (Action.REFUSE, "release_expired")
    highest = InstalledRecord(model_name="m", bundle_version=4, manifest_sha256="c" * 64)
    older = decide((release(7, version=2),), stages(r7=Stage.PROMOTED), identity=ME,
                   local=LocalRelease(bundle_version=3, highest=highest), now_ms=NOW)
    assert (older.action, older.reason) == (Action.REFUSE, "downgrade")
    assert "bundle v2: refusing to install m v2: this device already installed v4" in older.detail


@pytest.mark.parametrize("stage", [Stage.HALTED, Stage.ROLLED_BACK])
def test_decide_goes_back_from_a_withdrawn_release(stage: Stage) -> None:
    found = decide((release(2),), {2: StageRecord(release=2, stage=stage, reason="canary failed")}, identity=ME,
                   local=LocalRelease(bundle_version=3, running_release=2), now_ms=NOW)
    assert (found.action, found.reason) == (Action.REVERT, stage.value)
    assert "canary failed" in found.detail


def test_decide_goes_back_from_a_release_it_marked_failed() -> None:
    found = decide((release(2),), stages(r2=Stage.PROMOTED), identity=ME,
                   local=LocalRelease(bundle_version=3, running_release=2, failed=frozenset({2})), now_ms=NOW)
    assert (found.action, found.reason) == (Action.REVERT, "failed")


def test_judge_trial_the_health_rule() -> None:
    assert judge_trial(10, 0.5, 0.80, 0.90, max_accuracy_drop_pct=20).healthy
    assert judge_trial(10, 0.5, 0.91, None, max_accuracy_drop_pct=20).healthy
    assert not judge_trial(0, 0.5, 0.9, 0.9, max_accuracy_drop_pct=20).healthy
    assert "not finite" in judge_trial(10, math.nan, None, 0.9, max_accuracy_drop_pct=20).reason
    assert "not finite" in judge_trial(10, math.inf, 0.1, 0.9, max_accuracy_drop_pct=20).reason
    far = judge_trial(10, 0.5, 0.60, 0.90, max_accuracy_drop_pct=20)
    assert not far.healthy and "0.300 below" in far.reason
    assert judge_trial(10, 0.5, 0.70, 0.90, max_accuracy_drop_pct=20).healthy, "exactly at the limit passes"
