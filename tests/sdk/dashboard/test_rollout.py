"""The dashboard's rollout stage: retained TUF metadata in, the controller's verified word out (real repository, real
signatures; the broker is a dict, tests/release_support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.daemon.errors import ConfigError
from device_agent.keys import save_public_key
from device_agent.release.release_info import Stage
from sdk.dashboard.config import load_dashboard_config
from sdk.dashboard.rollout import RolloutReading, RolloutWatch
from sdk.dashboard.view import FleetView
from tests.release_support import DEVICES, ReleaseFixture, utc

PREFIX = "fedge/demo/release/metadata/"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fixture(tmp_path: Path, fleet_key) -> ReleaseFixture:
    return ReleaseFixture(tmp_path / "operator", fleet_key)


def _deliver(watch: RolloutWatch, fixture: ReleaseFixture) -> None:
    for name, payload in sorted(fixture.broker.items()):
        watch.file(PREFIX + name, payload)


def test_rollout_watch_shows_the_stage_and_follows_halt(fixture: ReleaseFixture, bundle_factory, tmp_path: Path) -> None:
    clock = Clock()
    watch = RolloutWatch(root=fixture.root_json, directory=tmp_path / "tuf", prefix=PREFIX, settle_s=0.5, clock=clock)
    assert watch.handles(PREFIX + "timestamp.json") and not watch.handles("fedge/lab/root/model/global")
    fixture.add(bundle_factory("fedalt"), canary=("eu-1",))
    _deliver(watch, fixture)
    assert not watch.due()  # not settled yet
    clock.now = 1.0
    assert watch.due()
    reading = watch.refresh(DEVICES)
    assert not watch.due() and reading.error == ""
    (row,) = reading.releases
    assert (row["release"], row["stage"], row["canary"], row["targeted"], row["canary_share"]) == (1, "canary", 1, 6, round(1 / 6, 4))
    assert row["version"] >= 1 and row["expired"] is False and row["reason"]
    fixture.stage(1, Stage.HALTED, "accuracy drop in eu")
    _deliver(watch, fixture)
    clock.now = 2.0
    halted = watch.refresh(DEVICES).releases[0]
    assert (halted["stage"], halted["reason"]) == ("halted", "accuracy drop in eu")
    view = FleetView(fleet="demo")
    view.apply_rollout(watch.refresh(DEVICES))
    assert view.snapshot()["rollout"]["releases"][0]["stage"] == "halted"


def test_rollout_watch_refuses_forged_or_replayed_metadata_and_shows_nothing_of_it(
        fixture: ReleaseFixture, bundle_factory, tmp_path: Path) -> None:
    clock = Clock()
    watch = RolloutWatch(root=fixture.root_json, directory=tmp_path / "tuf", prefix=PREFIX, settle_s=0.0, clock=clock)
    old_timestamp = fixture.broker["timestamp.json"]
    fixture.add(bundle_factory("fedalt"), stage=Stage.PROMOTED)
    _deliver(watch, fixture)
    assert watch.refresh(DEVICES).releases[0]["stage"] == "promoted"
    watch.file(PREFIX + "timestamp.json", old_timestamp)  # a broker replays older, validly signed metadata
    refused = watch.refresh(DEVICES)
    assert refused == RolloutReading(error="metadata_rollback")
    view = FleetView(fleet="demo")
    view.apply_rollout(refused)
    snapshot = view.snapshot()
    assert snapshot["rollout"]["releases"] == [] and "release metadata refused: metadata_rollback" in snapshot["problems"]
    fixture.repo.sign_timestamp(fixture.signers(), expires=utc(-60))
    fixture.publish()
    _deliver(watch, fixture)
    assert watch.refresh(DEVICES).error == "expired_metadata"
    watch.file(PREFIX + "evil.json", b"{}")  # not a metadata name: refused before TUF sees it
    assert not watch.due()


def test_dashboard_config_takes_a_release_root_and_names_a_missing_one(tmp_path: Path) -> None:
    save_public_key(Ed25519PrivateKey.generate().public_key(), tmp_path / "eu" / "eu-1.pub")
    (tmp_path / "root.json").write_text("{}")
    config = tmp_path / "dashboard.toml"
    config.write_text('fleet = "demo"\nrelease_root = "root.json"\n\n[registries]\neu = "eu"\n')
    assert load_dashboard_config(config).release_root == tmp_path / "root.json"
    config.write_text('fleet = "demo"\nrelease_root = "gone.json"\n\n[registries]\neu = "eu"\n')
    with pytest.raises(ConfigError, match="release_root"):
        load_dashboard_config(config)
