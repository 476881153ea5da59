"""The release controller on a real repository: promotes, halts, keeps online metadata fresh, publishes only on change."""

from __future__ import annotations

from pathlib import Path

from device_agent.protocol.status import DeviceStatus, ReleaseStatus
from device_agent.release.release_info import Stage
from sdk.release.canary import CanaryAction
from sdk.release.controller import ReleaseController
from tests.release_support import ReleaseFixture, utc


def _healthy(device: str, release: int, version: int) -> DeviceStatus:
    return DeviceStatus(fleet="demo", region="eu", device=device, sequence=1, timestamp_ms=1, online=True,
                        agent_version="0.1.0", bundle_version=version, last_loss=0.3, last_val_accuracy=0.9,
                        release=ReleaseStatus(state="installed", version=release, baseline_accuracy=0.9))


def test_controller_promotes_halts_and_publishes(tmp_path: Path, fleet_key, bundle_factory) -> None:
    operator = ReleaseFixture(tmp_path / "op", fleet_key)
    good = operator.add(bundle_factory("fedalt"), canary=("eu-1",))
    bad = operator.add(bundle_factory("fedalt", seed=9), canary=("eu-2",))
    published: list[int] = []
    statuses = {"eu-1": _healthy("eu-1", good.release, good.bundle_version),
                "eu-2": DeviceStatus(fleet="demo", region="eu", device="eu-2", sequence=1, timestamp_ms=1, online=True,
                                     agent_version="0.1.0", bundle_version=1,
                                     release=ReleaseStatus(state="rolled_back", version=bad.release, reason="diverged"))}
    ctl = ReleaseController(repository=lambda: operator.repo, statuses=lambda: statuses,
                            publish=lambda repo: published.append(repo.timestamp.md.signed.version),
                            signers=operator.signers(("rollout", "snapshot", "timestamp")))
    step = ctl.step()
    assert step.verdicts[good.release].action is CanaryAction.PROMOTE
    assert step.verdicts[bad.release].action is CanaryAction.HALT and "eu-2: rolled_back" in step.verdicts[bad.release].reason
    assert operator.repo.release(good.release).stage.stage is Stage.PROMOTED
    assert operator.repo.release(bad.release).stage.stage is Stage.HALTED
    assert step.published and len(published) == 1
    quiet = ctl.step()  # nothing in canary any more, nothing near expiry: nothing to publish
    assert quiet.verdicts == {} and not quiet.published and len(published) == 1


def test_controller_resigns_online_metadata_before_it_expires(tmp_path: Path, fleet_key) -> None:
    operator = ReleaseFixture(tmp_path / "op", fleet_key)
    before = operator.repo.timestamp.md.signed.version
    operator.repo.sign_timestamp(operator.signers(), expires=utc(60))  # within half its validity of expiring
    published: list[bool] = []
    ctl = ReleaseController(repository=lambda: operator.repo, statuses=dict, publish=lambda repo: published.append(True),
                            signers=operator.signers(("rollout", "snapshot", "timestamp")))
    step = ctl.step()
    assert step.refreshed == ("timestamp",) and published == [True]
    assert operator.repo.timestamp.md.signed.version == before + 2
