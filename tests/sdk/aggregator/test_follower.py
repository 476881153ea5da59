"""Which bundle version the federation runs: the promoted fleet-wide release with the highest bundle version."""

from __future__ import annotations

import hashlib

from device_agent.release.release_info import ReleaseInfo, ReleaseTargets, Stage, StageRecord, chunk_digests, release_path
from sdk.aggregator.follower import federation_release

DATA = b"b" * 2000


def release(number: int, version: int, *, targets: ReleaseTargets = ReleaseTargets()) -> ReleaseInfo:
    return ReleaseInfo(path=release_path(number), length=len(DATA), sha256=hashlib.sha256(DATA).hexdigest(), release=number,
                       bundle_version=version, model_name="m", fleet="demo", targets=targets, expires_ms=1,
                       chunk_size=1024, chunk_sha256=chunk_digests(DATA, 1024))


def staged(**by_number: Stage) -> dict[int, StageRecord]:
    return {int(k[1:]): StageRecord(release=int(k[1:]), stage=v) for k, v in by_number.items()}


def test_federation_follows_promoted_fleet_wide_releases_only() -> None:
    releases = (release(1, 2), release(2, 3), release(3, 4, targets=ReleaseTargets(groups=("pilot",))))
    assert federation_release(releases, staged(r1=Stage.PROMOTED, r2=Stage.CANARY, r3=Stage.PROMOTED), fleet="demo",
                              region=None).release == 1
    assert federation_release(releases, staged(r1=Stage.PROMOTED, r2=Stage.PROMOTED), fleet="demo",
                              region=None).release == 2
    assert federation_release(releases, {}, fleet="demo", region=None) is None
    assert federation_release(releases, staged(r1=Stage.PROMOTED), fleet="other", region=None) is None


def test_federation_never_follows_an_older_bundle_promoted_again_but_follows_a_rollback() -> None:
    releases = (release(1, 2), release(2, 3), release(3, 1))
    assert federation_release(releases, staged(r1=Stage.PROMOTED, r2=Stage.PROMOTED, r3=Stage.PROMOTED), fleet="demo",
                              region=None).release == 2
    assert federation_release(releases, staged(r1=Stage.PROMOTED, r2=Stage.ROLLED_BACK, r3=Stage.HALTED), fleet="demo",
                              region=None).release == 1


def test_a_region_also_follows_a_release_for_its_region() -> None:
    releases = (release(1, 2), release(2, 3, targets=ReleaseTargets(regions=("eu",))))
    stages = staged(r1=Stage.PROMOTED, r2=Stage.PROMOTED)
    assert federation_release(releases, stages, fleet="demo", region="eu").release == 2
    assert federation_release(releases, stages, fleet="demo", region="us").release == 1
    assert federation_release(releases, stages, fleet="demo", region=None).release == 1
