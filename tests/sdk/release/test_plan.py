"""Planning a release: the bundle must verify, canaries must exist and be targeted, a share is drawn per region."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.release.release_info import ReleaseTargets
from sdk.release.plan import ReleaseChoices, ReleasePlanError, chunk_size_for, pick_canary, plan_release

DEVICES = {f"eu-{i}": "eu" for i in range(10)} | {f"us-{i}": "us" for i in range(10)}


def test_pick_canary_draws_a_share_with_one_per_region_and_is_repeatable() -> None:
    chosen = pick_canary(DEVICES, ReleaseTargets(), 0.1, seed=7)
    assert len(chosen) == 2 and {DEVICES[d] for d in chosen} == {"eu", "us"}
    assert chosen == pick_canary(DEVICES, ReleaseTargets(), 0.1, seed=7)
    assert len(pick_canary(DEVICES, ReleaseTargets(), 0.5, seed=7)) == 10
    assert set(pick_canary(DEVICES, ReleaseTargets(regions=("us",)), 0.3, seed=1)) <= {d for d in DEVICES if d.startswith("us")}
    with pytest.raises(ReleasePlanError, match="no device matches"):
        pick_canary(DEVICES, ReleaseTargets(regions=("asia",)), 0.1, seed=1)


def test_chunk_size_fits_the_broker_limit() -> None:
    assert chunk_size_for(5 * 1024 * 1024) == 64 * 1024
    assert chunk_size_for(16 * 1024) == 15 * 1024
    with pytest.raises(ReleasePlanError):
        chunk_size_for(1500)


def test_plan_release_refuses_what_devices_would_refuse(bundle_factory, fleet_key) -> None:
    bundle = bundle_factory("fedalt")
    choices = ReleaseChoices(expires_ms=int(time.time() * 1000) + 60_000)
    info, data = plan_release(bundle, release=3, fleet="demo", fleet_key=fleet_key.public_key(), choices=choices,
                              message_size_limit=1 << 20, devices=DEVICES)
    assert info.release == 3 and info.length == len(data) and info.canary == ()
    with pytest.raises(ReleasePlanError, match="not a bundle signed by this fleet's key"):
        plan_release(bundle, release=3, fleet="demo", fleet_key=Ed25519PrivateKey.generate().public_key(), choices=choices,
                     message_size_limit=1 << 20)
    for canary, message in ((("nobody",), "not in the fleet"), (("us-1",), "not targeted")):
        with pytest.raises(ReleasePlanError, match=message):
            plan_release(bundle, release=3, fleet="demo", fleet_key=fleet_key.public_key(), message_size_limit=1 << 20,
                         choices=ReleaseChoices(expires_ms=1, canary=canary, targets=ReleaseTargets(regions=("eu",))),
                         devices=DEVICES)
    with pytest.raises(ReleasePlanError, match="not both"):
        plan_release(bundle, release=3, fleet="demo", fleet_key=fleet_key.public_key(), message_size_limit=1 << 20,
                     choices=ReleaseChoices(expires_ms=1, canary=("eu-1",), canary_share=0.1), devices=DEVICES)
