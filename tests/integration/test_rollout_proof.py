"""The Proof of issue 9, section 2: rollout over MQTT with a canary and rollback protection, for real.

Real Mosquitto (root + two bridged regional brokers, generated configs and
ACLs), real aggregator services, six real agents (subprocesses, ONNX Runtime
training on digits), the operator's real ``fedge`` CLI:

1. six devices in two regions on v1, rounds going;
2. v2 (other shared-layer shapes, same head) with a canary of two: the
   canaries install and try it, report healthy, the controller promotes it,
   all six switch, the aggregators switch at a round boundary, rounds go on
   on v2, and every device kept its personal head (same shapes);
3. v3, whose training diverges (SGD at learning rate 900): the canaries try it,
   go back to v2 by themselves, and the controller halts it at the canary;
4. a tampered bundle (one chunk differs from the signed metadata), expired
   metadata, and an older release re-published are each refused, with the
   reason in ``fedge fleet status``;
5. a device killed (SIGKILL) mid-download resumes from its chunks on disk
   and installs;
6. the operator rolls that release back: every device returns to the version
   it kept, the aggregators switch back at a round boundary, rounds go on.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from device_agent.protocol.status import ReleaseState
from device_agent.release.release_info import ReleaseTargets, Stage, StageRecord
from sdk.release.plan import ReleaseChoices, plan_release
from sdk.release.publisher import publish_repository
from tests.device_agent.bundle.resign import resigned
from tests.integration.rollout_harness import EU, US, LiveFleet

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]
ALL = (*EU, *US)
CANARIES = ("eu-dev-0001", "us-dev-0001")
SLOW = "us-dev-0003"
HIDDEN_V1, HIDDEN_V2 = (32, 16), (48, 16)


@pytest.fixture
def bundles(bundle_factory, fleet_key, tmp_path: Path) -> dict[int, Path]:
    """v1; v2 with wider shared layers (head unchanged); v3 diverging; v4 and v5 healthy v2 twins.

    The twins are v2's build re-signed as other versions (one export fewer each: builds dominate the set-up).
    """
    made = {1: bundle_factory("fedalt", hidden=HIDDEN_V1)}
    for version, kwargs in {2: dict(seed=1), 3: dict(seed=2, optimizer="sgd", lr=900.0), 4: dict(seed=1),
                            5: dict(seed=1)}.items():
        made[version] = resigned(bundle_factory("fedalt", hidden=HIDDEN_V2, **kwargs), tmp_path / f"v{version}.fedge",
                                 fleet_key, version=version)
    return made


@pytest.fixture
def live(bundles, fleet_key, digits):
    fleet = LiveFleet(bundle=bundles[1], fleet_key=fleet_key, digits=digits)
    try:
        yield fleet
    finally:
        fleet.close()


def test_rollout_proof(live: LiveFleet, bundles, fleet_key) -> None:
    fleet_dir = str(live.dir)

    def controller() -> None:
        live.fedge("release", "controller", fleet_dir, "--once")

    # 1. v1, rounds going.
    live.wait("six devices training on v1", lambda s: all(
        x is not None and x.bundle_version == 1 and x.last_round is not None and x.last_round >= 2 for x in s.values()))

    print(f"[{live.elapsed():6.1f} s] rounds on v1", flush=True)
    # 2. v2 with a canary of two: healthy, promoted, everyone switches, rounds go on, heads kept.
    out = live.fedge("release", "publish", fleet_dir, str(bundles[2]), "--canary", ",".join(CANARIES),
                     "--chunk-size", "16384", "--max-accuracy-drop", "40")
    assert "release 1:" in out and "canary on eu-dev-0001, us-dev-0001" in out
    live.wait("the canaries healthy on v2", lambda s: all(
        s[d] is not None and s[d].bundle_version == 2 and s[d].release.state is ReleaseState.INSTALLED for d in CANARIES))
    assert all(s is not None and s.bundle_version == 1 for d, s in live.statuses().items() if d not in CANARIES), \
        "the others wait for the canaries"
    print(f"[{live.elapsed():6.1f} s] canaries healthy", flush=True)
    live.wait("release 1 promoted", lambda s: live.stage(1) == "promoted", also=controller, timeout=60)

    def everyone_on_v2(statuses) -> bool:
        return all(x is not None and x.bundle_version == 2 and x.release.state is ReleaseState.INSTALLED
                   and x.release.version == 1 for x in statuses.values())

    on_v2 = live.wait("all six on v2 and the root switched", lambda s: everyone_on_v2(s)
                      and "switching from bundle v1 to v2" in live.service_log("root"), timeout=120)
    switch_round = max(x.last_round or 0 for x in on_v2.values() if x is not None)
    live.wait("rounds going on v2", lambda s: all(
        x is not None and x.bundle_version == 2 and x.last_round_status in ("accepted", "trained")
        and x.last_round is not None and x.last_round > switch_round + 1 for x in s.values()), timeout=120)
    for device in ALL:
        assert "personal parameters kept 2 (head.weight, head.bias), reset 0" in live.agents[device].text(), device
    for region in ("eu", "us"):
        assert "switching from bundle v1 to v2" in live.service_log(region)

    print(f"[{live.elapsed():6.1f} s] v2 everywhere", flush=True)
    # 3. v3 diverges: the canaries go back to v2 by themselves, the controller halts it at the canary.
    live.fedge("release", "publish", fleet_dir, str(bundles[3]), "--canary", ",".join(CANARIES), "--chunk-size", "16384")
    live.wait("the canaries back on v2 after trying v3", lambda s: all(
        s[d] is not None and s[d].bundle_version == 2 and s[d].release.state is ReleaseState.ROLLED_BACK
        and s[d].release.version == 2 for d in CANARIES))
    live.wait("release 2 halted", lambda s: live.stage(2) == "halted", also=controller, timeout=60)
    for device in CANARIES:
        assert "release 2 diverged on this device" in live.agents[device].text()
    statuses = live.statuses()
    assert all(s is not None and s.bundle_version == 2 for s in statuses.values()), "v3 never went past the canary"

    print(f"[{live.elapsed():6.1f} s] v3 halted", flush=True)
    # 4a. A tampered bundle: one chunk on the broker differs from what the signed metadata says.
    opened = live.release
    repo = opened.repository()
    info, data = plan_release(bundles[4], release=3, fleet="lab", fleet_key=fleet_key.public_key(),
                              choices=ReleaseChoices(canary=("eu-dev-0002",), chunk_size=16384,
                                                     expires_ms=int((time.time() + 3600) * 1000)),
                              message_size_limit=opened.message_size_limit, devices=opened.devices())
    repo.add_release(info, data, opened.signers(),
                     stage=StageRecord(release=3, stage=Stage.CANARY, reason="test", decided_ms=int(time.time() * 1000)))
    stored = repo.bundle_file(info)
    tampered = bytearray(stored.read_bytes())
    tampered[100] ^= 0xFF  # in transit or at rest: the chunk no longer matches its signed hash
    stored.write_bytes(bytes(tampered))
    publish_repository(repo, opened.broker("tamperer"), opened.fleet.spec.topology.layout)
    live.wait("the tampered chunk refused", lambda s: s["eu-dev-0002"] is not None
              and s["eu-dev-0002"].release.state is ReleaseState.REFUSED and s["eu-dev-0002"].release.version == 3
              and s["eu-dev-0002"].release.reason.startswith("hash_mismatch"))
    shown = json.loads(live.fedge("fleet", "status", fleet_dir, "--json"))
    row = next(r for r in shown["regions"]["eu"] if r["device"] == "eu-dev-0002")
    assert row["release"]["state"] == "refused" and row["release"]["reason"].startswith("hash_mismatch")
    live.wait("release 3 halted at its canary", lambda s: live.stage(3) == "halted", also=controller, timeout=60)

    print(f"[{live.elapsed():6.1f} s] tampered refused", flush=True)
    # 4b. Expired metadata: refused everywhere, the reason in the status; nothing else stops.
    repo = opened.repository()
    repo.sign_timestamp(opened.signers(), expires=_utc(-60))
    publish_repository(repo, opened.broker("drill"), opened.fleet.spec.topology.layout)
    live.wait("expired metadata refused by every device", lambda s: all(
        x is not None and x.release.state is ReleaseState.REFUSED and x.release.reason.startswith("expired_metadata")
        for x in s.values()))
    assert "expired_metadata" in live.fedge("fleet", "status", fleet_dir)
    controller()  # the controller re-signs what expired; the devices recover
    live.wait("fresh metadata accepted again", lambda s: all(
        x is not None and not x.release.reason.startswith("expired_metadata") for x in s.values()))

    print(f"[{live.elapsed():6.1f} s] expired refused", flush=True)
    # 4c. An older release re-published (bundle v1 as release 4, for everyone): refused as a downgrade.
    live.fedge("release", "publish", fleet_dir, str(bundles[1]), "--no-canary")
    live.wait("the older release refused everywhere", lambda s: all(
        x is not None and x.bundle_version == 2 and x.release.state is ReleaseState.REFUSED and x.release.version == 4
        and x.release.reason.startswith("downgrade") for x in s.values()))
    assert "downgrade" in live.fedge("fleet", "status", fleet_dir)
    assert "switching from bundle v2 to v1" not in live.service_log("root"), "the federation does not go back either"

    print(f"[{live.elapsed():6.1f} s] downgrade refused", flush=True)
    # 5. A device killed mid-download resumes from its chunks on disk and installs.
    slow = live.agents[SLOW]
    slow.stop()
    config = slow.device_dir / "agent.toml"
    config.write_text(config.read_text().replace("[release]\n", "[release]\nchunks_per_second = 3.0\n", 1))
    slow.start()
    live.fedge("release", "publish", fleet_dir, str(bundles[5]), "--no-canary", "--chunk-size", "8192")
    downloads = slow.device_dir / "var" / "state" / "release" / "downloads"
    deadline = time.monotonic() + 60
    while len(list(downloads.glob("*/*.chunk"))) < 4:
        assert time.monotonic() < deadline, f"{SLOW} did not start downloading:\n{slow.text()[-3000:]}"
        time.sleep(0.1)
    slow.kill()
    held = len(list(downloads.glob("*/*.chunk")))
    total = opened.repository().release(5).info.chunks
    assert 4 <= held < total, (held, total)
    slow.start()
    live.wait("all six on v5, the killed one included", lambda s: all(
        x is not None and x.bundle_version == 5 and x.release.state is ReleaseState.INSTALLED and x.release.version == 5
        for x in s.values()), timeout=120)
    resumed = re.findall(r"release 5 \(bundle v5\): fetching (\d+) chunk\(s\), (\d+) on disk already", slow.text())
    assert resumed and int(resumed[-1][1]) >= 4, resumed
    print(f"[{live.elapsed():6.1f} s] resumed and installed", flush=True)

    # 6. The operator rolls release 5 back: every device returns to the v2 it kept, the aggregators follow.
    out = live.fedge("release", "rollback", fleet_dir, "5", "--reason", "regression found")
    assert "release 5" in out and "rolled_back" in out
    back = live.wait("everyone back on v2, the root too", lambda s: all(
        x is not None and x.bundle_version == 2 and x.release.state is ReleaseState.ROLLED_BACK and x.release.version == 5
        for x in s.values()) and "switching from bundle v5 to v2" in live.service_log("root"), timeout=120)
    last = max(x.last_round or 0 for x in back.values() if x is not None)
    live.wait("rounds going on v2 again", lambda s: all(
        x is not None and x.bundle_version == 2 and x.last_round is not None and x.last_round > last + 1
        for x in s.values()), timeout=120)
    print(f"[{live.elapsed():6.1f} s] rolled back", flush=True)
    assert live.elapsed() < 600


def _utc(seconds: float):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(time.time() + seconds, tz=timezone.utc)
