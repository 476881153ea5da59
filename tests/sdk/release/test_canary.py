"""The canary policy, pure: waiting, healthy, unhealthy (rolled back, refused, far below), promote, halt, timeout."""

from __future__ import annotations

import hashlib

from device_agent.protocol.status import DeviceStatus, ReleaseStatus
from device_agent.release.release_info import ReleaseInfo, chunk_digests, release_path
from sdk.release.canary import CanaryAction, CanaryPolicy, judge_canaries

DATA = b"bundle" * 300
INFO = ReleaseInfo(path=release_path(2), length=len(DATA), sha256=hashlib.sha256(DATA).hexdigest(), release=2,
                   bundle_version=5, model_name="m", fleet="demo", canary=("eu-1", "us-1"), expires_ms=1 << 50,
                   chunk_size=1024, chunk_sha256=chunk_digests(DATA, 1024), max_accuracy_drop_pct=10)


def status(device: str, *, version: int = 5, state: str = "installed", release: int | None = 2, loss: float | None = 0.4,
           accuracy: float | None = 0.85, baseline: float | None = 0.9, reason: str = "") -> DeviceStatus:
    return DeviceStatus(fleet="demo", region=device.split("-")[0], device=device, sequence=1, timestamp_ms=1, online=True,
                        agent_version="0.1.0", bundle_version=version, last_loss=loss, last_val_accuracy=accuracy,
                        release=ReleaseStatus(state=state, version=release, reason=reason, baseline_accuracy=baseline))


def test_promotes_when_every_canary_is_healthy() -> None:
    verdict = judge_canaries(INFO, {"eu-1": status("eu-1"), "us-1": status("us-1")}, staged_ms=0, now_ms=1000)
    assert verdict.action is CanaryAction.PROMOTE and verdict.reason == "2/2 canaries healthy"
    assert [c.state for c in verdict.canaries] == ["healthy", "healthy"]


def test_waits_for_a_canary_that_has_not_switched_yet() -> None:
    verdict = judge_canaries(INFO, {"eu-1": status("eu-1"), "us-1": status("us-1", version=4, state="fetching")},
                             staged_ms=0, now_ms=1000)
    assert verdict.action is CanaryAction.WAIT and verdict.canaries[1].state == "waiting"
    assert judge_canaries(INFO, {"eu-1": status("eu-1")}, staged_ms=0, now_ms=1000).action is CanaryAction.WAIT


def test_halts_at_the_first_unhealthy_canary() -> None:
    cases = {
        "rolled back": status("us-1", version=4, state="rolled_back", reason="diverged: loss not finite"),
        "refused": status("us-1", state="refused", version=4, reason="hash_mismatch: chunk 0"),
        "far below": status("us-1", accuracy=0.7),
        "non-finite": status("us-1", loss=float("nan")),
    }
    for name, bad in cases.items():
        verdict = judge_canaries(INFO, {"eu-1": status("eu-1"), "us-1": bad}, staged_ms=0, now_ms=1000)
        assert verdict.action is CanaryAction.HALT, name
        assert verdict.reason.startswith("us-1: "), verdict.reason


def test_min_healthy_and_timeout() -> None:
    some = {"eu-1": status("eu-1"), "us-1": None}
    assert judge_canaries(INFO, some, staged_ms=0, now_ms=1000,
                          policy=CanaryPolicy(min_healthy=0.5)).action is CanaryAction.PROMOTE
    late = judge_canaries(INFO, some, staged_ms=0, now_ms=1_900_000, policy=CanaryPolicy(timeout_s=1800))
    assert late.action is CanaryAction.HALT and late.reason.startswith("timeout: 1/2")
    stricter = judge_canaries(INFO, {"eu-1": status("eu-1", accuracy=0.86), "us-1": status("us-1", accuracy=0.86)},
                              staged_ms=0, now_ms=1, policy=CanaryPolicy(max_accuracy_drop_pct=2))
    assert stricter.action is CanaryAction.HALT
